"""The KV cache the compiled model owns: explicit per-layer tensors, allocated from each layer's spec.

Every layer graph declares its cache inputs in ``gm.meta["atom.kv_cache_spec"]``: a list of
(placeholder name, dtype, last dim). A float cache is ``[("k_cache", "model", D), ("v_cache", "model", D)]``;
the 4-bit cache of ``QuantizeKVCache`` is uint8 codes ``[B, H_kv, S, D/2]`` plus float16 (scale, zero)
pairs ``[B, H_kv, S, 2]`` for K and for V. Sequences advance together through ``seqlens`` [B] (int32),
the number of filled slots of each sequence; the layers read it and the model advances it once per step.

The layout is contiguous per sequence ([B, H_kv, S_max, ...]); a paged cache would index the same
per-slot records through a block table.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import Tensor

_UNIFORM_CACHE_LENGTH: contextvars.ContextVar[int | None] = contextvars.ContextVar("atom_uniform_cache_length",
                                                                                default=None)


@contextlib.contextmanager
def uniform_cache_length(n: int | None):
    """Tells the layers run inside it that every sequence's cache held exactly ``n`` tokens before this step
    (0: a prompt's prefill; None: unknown or unequal), a fact the host knows and the device lengths would need a
    synchronization to reveal. The Triton attention then attends with cuDNN's flash kernel over the dequantized
    cache (``attention_quant_kv``'s ``prefix_len``). ``AtomForCausalLM.forward`` sets it; set it yourself only
    around a layer whose caches all hold ``n`` tokens before the call."""
    token = _UNIFORM_CACHE_LENGTH.set(n)
    try:
        yield
    finally:
        _UNIFORM_CACHE_LENGTH.reset(token)


def current_uniform_cache_length() -> int | None:
    return _UNIFORM_CACHE_LENGTH.get()


def spec_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    return model_dtype if name == "model" else getattr(torch, name)


def allocate_layer_cache(spec, batch: int, num_kv_heads: int, max_len: int, model_dtype, device) -> list[Tensor]:
    """Zero-filled tensors for one layer's cache inputs, in placeholder order."""
    return [
        torch.zeros(batch, num_kv_heads, max_len, last, dtype=spec_dtype(dt, model_dtype), device=device)
        for _, dt, last in spec
    ]


class KVCache:
    """The caches of every layer plus the shared fill level of each sequence."""

    def __init__(self, specs, batch: int, num_kv_heads: int, max_len: int, model_dtype, device):
        self.max_len = max_len
        self.layers = [allocate_layer_cache(s, batch, num_kv_heads, max_len, model_dtype, device) for s in specs]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)

    @property
    def batch_size(self) -> int:
        return self.seqlens.shape[0]

    def advance(self, n_tokens: int) -> None:
        self.seqlens += n_tokens

    def set_lengths(self, lengths) -> None:
        """Each sequence's true length, e.g. after a right-padded batched prefill: the next tokens of a
        shorter sequence go right after its own last token and overwrite its padding."""
        lengths = torch.as_tensor(lengths, dtype=torch.int32, device=self.seqlens.device)
        if lengths.shape != self.seqlens.shape or bool((lengths < 0).any()) or bool((lengths > self.seqlens).any()):
            raise ValueError(f"lengths must be {self.batch_size} values in [0, current length], "
                             f"got {lengths.tolist()} for current lengths {self.seqlens.tolist()}")
        self.seqlens = lengths.clone()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)
