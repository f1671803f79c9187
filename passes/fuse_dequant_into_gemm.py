"""FuseDequantIntoGemm: a linear whose operands are dequantized becomes one quantized GEMM.

Requires: {"quantized"}
Provides: {"fused_gemm"}

    Before: %xd = atom.dequantize_act(%xq0, %xq1, %xq2, %xq3, ...)
            %wd = atom.dequantize_weight(%wq, %ws, %wo, %wos, ...)
            %y  = aten.linear(%xd, %wd, %bias)
    After:  %y  = atom.quant_linear(%xq0, %xq1, %xq2, %xq3, %wq, %ws, %wo, %wos, %bias, "int4", "int4", 128, "int8", 1, float32)

    Before: %wd = atom.dequantize_weight(...);  %y = aten.linear(%x, %wd, %bias)        (float activations)
    After:  %y  = atom.weight_only_linear(%x, %wq, %ws, %wo, %wos, %bias, "int4", 128, "int8", 1)

The fused op accumulates each group's integer products exactly and applies the scales to the
partial sums; the unfused graph multiplies dequantized floats. The two agree up to float
summation order (tests bound the difference in float64). Dequant nodes left without users are erased.
"""

from __future__ import annotations

import torch.fx as fx

from .base import AtomPass, PassResult, aten, atom


class FuseDequantIntoGemm(AtomPass):
    requires = frozenset({"quantized"})
    provides = frozenset({"fused_gemm"})

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for lin in list(gm.graph.nodes):
            if lin.target != aten.linear.default:
                continue
            x, w = lin.args[:2]
            bias = lin.args[2] if len(lin.args) > 2 else None
            if not (isinstance(w, fx.Node) and w.target == atom.dequantize_weight.default):
                continue
            wq, ws, wo, wos, w_fmt, group, o_fmt, rows_per_scale, dtype = w.args
            if isinstance(x, fx.Node) and x.target == atom.dequantize_act.default:
                xq, xs, xo, xos, a_fmt, a_group, a_ofmt, _ = x.args
                if (a_group, a_ofmt) != (group, o_fmt):
                    raise ValueError(f"{lin.name}: activation and weight groups disagree ({a_group} vs {group})")
                target = atom.quant_linear.default
                args = (xq, xs, xo, xos, wq, ws, wo, wos, bias, a_fmt, w_fmt, group, o_fmt, rows_per_scale, dtype)
            else:
                target = atom.weight_only_linear.default
                args = (x, wq, ws, wo, wos, bias, w_fmt, group, o_fmt, rows_per_scale)
            lin.target = target  # rewritten in place: the node keeps its name and its users
            lin.args = args
            for dead in (w, x):
                if isinstance(dead, fx.Node) and not dead.users and dead.target in (
                    atom.dequantize_weight.default, atom.dequantize_act.default
                ):
                    gm.graph.erase_node(dead)
            modified = True
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)
