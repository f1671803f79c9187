"""The pass pipeline: one literal list, a requires/provides check, and instrument hooks."""

from __future__ import annotations

import time

import torch.fx as fx

from atom_compile.instruments import node_census
from atom_compile.passes import (
    FuseDequantIntoGemm,
    FuseQuantIntoNorm,
    FuseSiblingGemms,
    InsertQuantNodes,
    MergeSlicedHeadOps,
    OutlierAnalysis,
    PassContext,
    QuantizeKVCache,
    ReorderChannels,
    RotateKVHeads,
)

PIPELINE = [
    RotateKVHeads,        # optional (kv_rotation): Hadamard per head on K after RoPE and on V, folded into weights
    OutlierAnalysis,      # score input channels on calibration data; outliers last
    ReorderChannels,      # fold the order into the norms, gate/up rows and weight columns
    InsertQuantNodes,     # RTN/GPTQ weights, dynamic per-token activation quantizers
    FuseQuantIntoNorm,    # norm+quant, silu*mul+quant, gather+quant
    FuseDequantIntoGemm,  # dequant+linear -> quantized GEMM
    FuseSiblingGemms,     # q/k/v and gate/up GEMMs on one input -> one GEMM each, sliced
    MergeSlicedHeadOps,   # RoPE / Hadamard of q and k (adjacent slices) -> one launch each
    QuantizeKVCache,      # 4-bit K/V on write, attention over the quantized cache
]


class PipelineError(RuntimeError):
    """The pipeline is mis-ordered, or a pass failed."""


def check_chain(passes) -> None:
    """Every pass's ``requires`` must be provided by a pass before it; fail naming both."""
    provided: dict[str, str] = {}
    for p in passes:
        for fact in sorted(p.requires):
            if fact not in provided:
                providers = [q.__name__ for q in _all_passes() if fact in q.provides] or ["no known pass"]
                raise PipelineError(
                    f"{p.__name__} requires {fact!r}, which is provided by {' or '.join(providers)}; "
                    f"that pass must run before {p.__name__}"
                )
        for fact in p.provides:
            provided.setdefault(fact, p.__name__)


def _all_passes() -> list[type]:
    from atom_compile.passes import AtomPass

    found, todo = [], list(AtomPass.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, instruments=(), passes=PIPELINE) -> fx.GraphModule:
    """Run ``passes`` over one layer graph in place, calling each instrument before and after every pass."""
    check_chain(passes)
    for inst in instruments:
        inst.before_pipeline(gm, ctx)
    ran: list[str] = []
    for index, cls in enumerate(passes, start=1):
        p = cls(ctx)
        before = node_census(gm.graph.nodes)  # snapshot: passes may rewrite nodes in place
        n_before = len(gm.graph.nodes)
        start = time.perf_counter()
        try:
            result = p.call(gm)
        except ValueError as e:  # a clear, user-facing error: keep its type and message
            e.add_note(f"(in pass {p.name}, layer {gm.meta.get('atom.layer_index')}; passes run before it: {ran})")
            raise
        except Exception as e:
            raise PipelineError(
                f"pass {p.name} failed on layer {gm.meta.get('atom.layer_index')} after {ran or 'no passes'}: "
                f"{type(e).__name__}: {e}"
            ) from e
        seconds = time.perf_counter() - start
        gm = result.graph_module
        for inst in instruments:
            inst.after_pass(index, p, gm, result.modified, (n_before, before), seconds, ctx)
        ran.append(p.name)
    return gm
