"""ReorderChannels: apply each input's channel order so that its outlier channels sit together, last.

Requires: {"outlier_order"}
Provides: {"reordered"}   (and permutes the input Hessians recorded for GPTQ)

Each linear's weight columns are permuted; the producer of its input is changed to emit the same
order, so the maths is unchanged (up to float summation order inside the GEMM)::

    Before: %n = atom.rms_norm(%x, %w, eps, None);      %q = aten.linear(%n, %Wq)
    After:  %n = atom.rms_norm(%x, %w[p], eps, %p);     %q = aten.linear(%n, %Wq[:, p])

    Before: %a = atom.attention(...);                    %o = aten.linear(%a, %Wo)
    After:  %a = atom.attention(...);  %g = aten.index_select(%a, -1, %p);  %o = aten.linear(%g, %Wo[:, p])

    Before: %m = mul(silu(linear(%n, %Wg)), linear(%n, %Wu));                 %d = aten.linear(%m, %Wd)
    After:  %m = mul(silu(linear(%n, %Wg[p, :])), linear(%n, %Wu[p, :]));     %d = aten.linear(%m, %Wd[:, p])

The norm gathers its output (the residual stream itself stays in model order); gate/up rows are
permuted so that SiLU(gate) * up comes out in down_proj's order with no gather at run time; the
attention output needs a gather, which FuseQuantIntoNorm later fuses with its quantization.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .base import AtomPass, PassResult, add_attr, aten, atom, get_attr_tensor, set_attr_tensor
from .outlier_analysis import linear_inputs


def _permute(t: torch.Tensor, dim: int, perm: torch.Tensor) -> torch.Tensor:
    return t.index_select(dim, perm.to(t.device)).contiguous()


def _permute_rows(gm: fx.GraphModule, lin: fx.Node, perm: torch.Tensor) -> None:
    w = lin.args[1]
    set_attr_tensor(gm, w.target, _permute(get_attr_tensor(gm, w), 0, perm))
    bias = lin.args[2] if len(lin.args) > 2 else None
    if bias is not None:
        set_attr_tensor(gm, bias.target, _permute(get_attr_tensor(gm, bias), 0, perm))


def _gated_mlp_producers(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(gate, up) linears if ``node`` is mul(silu(gate), up) and both feed nothing else."""
    if node.target != aten.mul.Tensor:
        return None
    silu, up = node.args
    if not (isinstance(silu, fx.Node) and silu.target == aten.silu.default):
        return None
    gate = silu.args[0]
    ok = all(
        isinstance(n, fx.Node) and n.target == aten.linear.default and n.args[1].op == "get_attr"
        and len(n.users) == 1
        for n in (gate, up)
    )
    return (gate, up) if ok and len(silu.users) == 1 else None


class ReorderChannels(AtomPass):
    requires = frozenset({"outlier_order"})
    provides = frozenset({"reordered"})

    def call(self, gm: fx.GraphModule) -> PassResult:
        orders: dict[str, torch.Tensor] = gm.meta["atom.outlier_order"]
        if not orders:
            return PassResult(gm, False)
        hessians = gm.meta.get("atom.input_hessians", {})
        nodes = {n.name: n for n in gm.graph.nodes}
        groups = linear_inputs(gm)
        for name, perm in orders.items():
            src = nodes[name]
            consumers = groups[name]
            only_linears = len(src.users) == len(consumers)
            mlp = _gated_mlp_producers(src)
            if src.target == atom.rms_norm.default and only_linears and src.args[3] is None:
                norm_w = get_attr_tensor(gm, src.args[1])
                set_attr_tensor(gm, src.args[1].target, _permute(norm_w, 0, perm))
                src.args = (*src.args[:3], add_attr(gm, src, f"{name}_perm", perm.to(norm_w.device)))
                src.meta["atom.perm"] = perm
                src.meta["atom.reorder"] = "gather fused into the norm"
            elif mlp is not None and only_linears:
                for lin in mlp:
                    _permute_rows(gm, lin, perm)
                src.meta["atom.perm"] = perm
                src.meta["atom.reorder"] = "gate/up rows permuted"
            else:
                set_attr_tensor(gm, f"{name}_perm", perm.to(get_attr_tensor(gm, consumers[0].args[1]).device))
                with gm.graph.inserting_after(src):
                    perm_node = gm.graph.get_attr(f"{name}_perm")
                with gm.graph.inserting_after(perm_node):
                    gather = gm.graph.call_function(aten.index_select.default, (src, -1, perm_node))
                gather._rename(f"{name}_gathered")
                for lin in consumers:
                    lin.replace_input_with(src, gather)
                gather.meta["atom.perm"] = perm
                gather.meta["atom.reorder"] = "explicit gather"
            if name in hessians:  # GPTQ's X^T X follows its input into the new order
                hessians[name] = hessians[name][perm][:, perm]
            for lin in consumers:
                w = lin.args[1]
                set_attr_tensor(gm, w.target, _permute(get_attr_tensor(gm, w), 1, perm))
                lin.meta["atom.input_perm"] = perm
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)
