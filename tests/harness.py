"""The pass-test harness: run a prefix of the pipeline on a real layer, apply one pass, check ops and numerics.

Numerics rules (one per pass, see RULES):
- "exact": torch.equal of the layer outputs (passes that must not change the maths at all);
- "reassoc": equal up to float summation order; both graphs are run in float64, where that order
  changes results by ~1e-16 relative, and must agree to REASSOC_RTOL;
- "fake_quant": the graph after the pass equals an independent fake-quant reference (tests/fake_quant.py)
  applied to the graph before it: same float32 formulas, so equal to FAKE_QUANT_TOL (bit-equal in practice);
- "fake_quant_kv": likewise for the KV cache.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.fx as fx

from atom_compile.instruments import VerifyGraph, node_census
from atom_compile.kv_cache import allocate_layer_cache
from atom_compile.passes import PassContext
from atom_compile.pipeline import PIPELINE
from fake_quant import fake_quant_kv, fake_quant_rows

REASSOC_RTOL = 1e-10
FAKE_QUANT_TOL = 1e-6

RULES = {
    "RotateKVHeads": "reassoc",
    "OutlierAnalysis": "exact",
    "ReorderChannels": "reassoc",
    "InsertQuantNodes": "fake_quant",
    "FuseQuantIntoNorm": "exact",
    "FuseDequantIntoGemm": "reassoc",
    "FuseSiblingGemms": "exact",
    "MergeSlicedHeadOps": "exact",
    "QuantizeKVCache": "fake_quant_kv",
}

aten = torch.ops.aten
atom = torch.ops.atom


@dataclasses.dataclass
class LayerInputs:
    hidden: torch.Tensor  # [B, T, H]
    cos: torch.Tensor  # [B, T, D]
    sin: torch.Tensor
    num_kv_heads: int

    def to(self, dtype):
        return LayerInputs(self.hidden.to(dtype), self.cos.to(dtype), self.sin.to(dtype), self.num_kv_heads)


def run_layer(gm: fx.GraphModule, inp: LayerInputs, interpreter=None) -> torch.Tensor:
    B, T, _ = inp.hidden.shape
    caches = allocate_layer_cache(gm.meta["atom.kv_cache_spec"], B, inp.num_kv_heads, T, inp.hidden.dtype, "cpu")
    args = (inp.hidden, inp.cos, inp.sin, torch.zeros(B, dtype=torch.int32), *caches)
    with torch.no_grad():
        return interpreter(gm).run(*args) if interpreter else gm(*args)


def run_prefix(gm: fx.GraphModule, ctx: PassContext, upto) -> fx.GraphModule:
    """Run the pipeline's passes before ``upto`` (a pass class), verifying after each."""
    verify = VerifyGraph()
    for cls in PIPELINE:
        if cls is upto:
            break
        gm = cls(ctx).call(gm).graph_module
        verify.facts |= set(cls.provides)
        verify.verify(gm, ctx, f"after {cls.__name__}")
    return gm


class FakeQuantInterpreter(fx.Interpreter):
    """Runs a float (reordered) layer graph with Atom's fake quantization on every linear and/or the KV cache."""

    def __init__(self, gm, config, linears=True, kv=False):
        super().__init__(gm)
        self.config = config
        self.linears = linears
        self.kv = kv

    def call_function(self, target, args, kwargs):
        if self.linears and target == aten.linear.default:
            x, w, *rest = args
            spec = self.config.resolve(w.shape[1])
            if self.config.quantizes_activations:
                x = fake_quant_rows(x, spec, "act")
            w = fake_quant_rows(w, spec, "weight")
            return aten.linear.default(x, w, *rest)
        if self.kv and target == atom.kv_cache_store.default:
            k, v, k_cache, v_cache, seqlens = args
            D = k_cache.shape[-1]
            kq = fake_quant_kv(k.unflatten(-1, (-1, D)), self.config.kv_bits, self.config.kv_clip).flatten(-2)
            vq = fake_quant_kv(v.unflatten(-1, (-1, D)), self.config.kv_bits, self.config.kv_clip).flatten(-2)
            return target(kq, vq, k_cache, v_cache, seqlens)
        return super().call_function(target, args, kwargs)


def as_float64(gm: fx.GraphModule) -> fx.GraphModule:
    """A float64 copy of a layer graph: float buffers and every float32 dtype argument of its ops."""
    g = copy.deepcopy(gm).double()
    for n in g.graph.nodes:
        n.args = tuple(torch.float64 if a is torch.float32 else a for a in n.args)
    g.recompile()
    return g


def compare(rule: str, before: fx.GraphModule, after: fx.GraphModule, inp: LayerInputs, ctx: PassContext) -> None:
    if rule == "exact":
        a, b = run_layer(after, inp), run_layer(before, inp)
        assert torch.equal(a, b), f"outputs differ: max |diff| {(a - b).abs().max():.3e}"
    elif rule == "reassoc":
        a = run_layer(as_float64(after), inp.to(torch.float64))
        b = run_layer(as_float64(before), inp.to(torch.float64))
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < REASSOC_RTOL, f"float64 relative difference {rel:.3e} exceeds {REASSOC_RTOL}"
    elif rule in ("fake_quant", "fake_quant_kv"):
        ref = run_layer(before, inp, lambda g: FakeQuantInterpreter(
            g, ctx.config, linears=rule == "fake_quant", kv=rule == "fake_quant_kv"))
        out = run_layer(after, inp)
        torch.testing.assert_close(out, ref, rtol=FAKE_QUANT_TOL, atol=FAKE_QUANT_TOL)
    else:
        raise ValueError(rule)


def check_pass(pass_cls, gm, ctx, inp: LayerInputs, ops_before=None, ops_after=None, rule=None):
    """Apply ``pass_cls`` to ``gm`` (already run up to it), verify, check op counts and numerics."""
    before = copy.deepcopy(gm)
    census_before = node_census(gm.graph.nodes)
    for op, count in (ops_before or {}).items():
        assert census_before[op] == count, f"before {pass_cls.__name__}: {op} x{census_before[op]}, expected {count}"
    result = pass_cls(ctx).call(gm)
    after = result.graph_module
    verify = VerifyGraph()
    verify.facts = {f for cls in PIPELINE[: PIPELINE.index(pass_cls) + 1] for f in cls.provides}
    verify.verify(after, ctx, f"after {pass_cls.__name__}")
    census_after = node_census(after.graph.nodes)
    for op, count in (ops_after or {}).items():
        assert census_after[op] == count, f"after {pass_cls.__name__}: {op} x{census_after[op]}, expected {count}"
    compare(rule or RULES[pass_cls.__name__], before, after, inp, ctx)
    return before, after, result.modified
