"""FuseQuantIntoNorm: fold each activation quantizer into the op that produces its input.

Requires: {"quantized"}
Provides: {"fused_quant"}

Three producers are fused, each into one op that makes one pass over a token's row::

    Before: %n  = atom.rms_norm(%x, %w, eps, %perm);  %xq = atom.quantize_act(%n, fmt...)
    After:  %xq = atom.rms_norm_quant(%x, %w, eps, %perm, fmt...)

    Before: %s = aten.silu(%gate);  %m = aten.mul(%s, %up);  %xq = atom.quantize_act(%m, fmt...)
    After:  %xq = atom.silu_mul_quant(%gate, %up, fmt...)

    Before: %g = aten.index_select(%a, -1, %perm);  %xq = atom.quantize_act(%g, fmt...)
    After:  %xq = atom.gather_quant(%a, %perm, fmt...)

The fused reference ops run the same float operations in the same order, so the codes and scales
are bit-identical (tests use torch.equal). A producer with other users is left alone.
"""

from __future__ import annotations

import torch.fx as fx

from .base import AtomPass, PassResult, aten, atom


def _fused_form(producer: fx.Node):
    """(fused op, leading args) for a producer that can absorb a following quantize_act, else None."""
    if producer.target == atom.rms_norm.default:
        x, w, eps, perm = producer.args
        return atom.rms_norm_quant.default, (x, w, eps, perm), []
    if producer.target == aten.mul.Tensor:
        silu, up = producer.args
        if isinstance(silu, fx.Node) and silu.target == aten.silu.default and len(silu.users) == 1:
            return atom.silu_mul_quant.default, (silu.args[0], up), [silu]
    if producer.target == aten.index_select.default and producer.args[1] == -1:
        return atom.gather_quant.default, (producer.args[0], producer.args[2]), []
    return None


class FuseQuantIntoNorm(AtomPass):
    requires = frozenset({"quantized"})
    provides = frozenset({"fused_quant"})

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for q in list(gm.graph.nodes):
            if q.target != atom.quantize_act.default:
                continue
            producer = q.args[0]
            if not isinstance(producer, fx.Node) or len(producer.users) != 1:
                continue
            fused = _fused_form(producer)
            if fused is None:
                continue
            target, lead, also_dead = fused
            q.meta.update({k: v for k, v in producer.meta.items() if k.startswith("atom.")})
            q.target = target  # rewritten in place: the node keeps its name and its users
            q.args = (*lead, *q.args[1:])
            gm.graph.erase_node(producer)
            for n in also_dead:
                gm.graph.erase_node(n)
            modified = True
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)
