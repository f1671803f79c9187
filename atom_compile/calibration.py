"""Calibration data as one layer sees it, and running a layer graph over it while watching nodes."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.fx as fx
from torch import Tensor

from atom_compile.kv_cache import allocate_layer_cache


class NonFiniteActivationError(ValueError):
    """Calibration produced NaN or Inf activations."""


class LayerCalibration:
    """The calibration inputs of one decoder layer: hidden states [N, L, H] and the rotary tables.

    ``hidden`` holds the layer's inputs as the model compiled so far computes them (earlier layers
    already quantized), which is what Atom's GPTQ and outlier statistics are taken on.
    """

    def __init__(self, hidden: Tensor, cos: Tensor, sin: Tensor, num_kv_heads: int, batch_size: int = 8):
        self.hidden = hidden
        self.cos = cos  # [1, L, D]
        self.sin = sin
        self.num_kv_heads = num_kv_heads
        self.batch_size = batch_size

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]

    def batches(self, gm: fx.GraphModule) -> Iterable[tuple]:
        """Layer inputs for each chunk of sequences, with a fresh cache of the layer's own layout."""
        N, L, _ = self.hidden.shape
        spec = gm.meta["atom.kv_cache_spec"]
        for start in range(0, N, self.batch_size):
            h = self.hidden[start : min(start + self.batch_size, N)]
            b = h.shape[0]
            caches = allocate_layer_cache(spec, b, self.num_kv_heads, L, h.dtype, h.device)
            seqlens = torch.zeros(b, dtype=torch.int32, device=h.device)
            yield (h, self.cos.expand(b, -1, -1), self.sin.expand(b, -1, -1), seqlens, *caches)

    def run(
        self,
        gm: fx.GraphModule,
        watch: Iterable[str] = (),
        on_value: Callable[[str, Tensor], None] | None = None,
    ) -> Tensor:
        """Run ``gm`` over all calibration sequences; call ``on_value(node_name, value)`` for watched nodes.

        Returns the layer's outputs [N, L, H]. When only watched values are wanted, the interpreter
        stops after the last watched node of each chunk and the returned tensor is empty.
        """
        watch = set(watch)
        outputs = []
        for inputs in self.batches(gm):
            if watch:
                _WatchingInterpreter(gm, watch, on_value).run(*inputs)
            else:
                outputs.append(gm(*inputs))
        return torch.cat(outputs) if outputs else torch.empty(0)

    def advance(self, gm: fx.GraphModule, layer_index: int) -> None:
        """Replace the hidden states with this (compiled) layer's outputs, for the next layer."""
        with torch.no_grad():
            out = self.run(gm)
        check_finite(out, f"the output of layer {layer_index} on the calibration data")
        self.hidden = out


class _StopInterpreter(Exception):
    pass


class _WatchingInterpreter(fx.Interpreter):
    def __init__(self, gm, watch, on_value):
        super().__init__(gm)
        self.remaining = set(watch)
        self.on_value = on_value

    def run(self, *args):
        try:
            with torch.no_grad():
                return super().run(*args)
        except _StopInterpreter:
            return None

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.remaining:
            self.on_value(n.name, out)
            self.remaining.discard(n.name)
            if not self.remaining:
                raise _StopInterpreter
        return out


def check_finite(t: Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise NonFiniteActivationError(
            f"{bad} NaN/Inf values in {what}. Check the calibration tokens and the model weights "
            "(a float16 model can overflow: load it in float32 or bfloat16)."
        )
