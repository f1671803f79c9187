"""FuseSiblingGemms: quantized GEMMs that read the same input become one GEMM (horizontal fusion).

Requires: {"fused_gemm"}
Provides: {"fused_siblings"}

    Before: %q_proj = atom.quant_linear(%xq0, %xq1, %xq2, %xq3, %q_proj_wq, %q_proj_ws, %q_proj_wo, %q_proj_wos, None, fmt...)
            %k_proj = atom.quant_linear(%xq0, %xq1, %xq2, %xq3, %k_proj_wq, %k_proj_ws, %k_proj_wo, %k_proj_wos, None, fmt...)
            %v_proj = atom.quant_linear(%xq0, %xq1, %xq2, %xq3, %v_proj_wq, %v_proj_ws, %v_proj_wo, %v_proj_wos, None, fmt...)
    After:  %qkv_proj = atom.quant_linear(%xq0, %xq1, %xq2, %xq3, %qkv_proj_wq, %qkv_proj_ws, %qkv_proj_wo, %qkv_proj_wos,
                                          None, fmt...)
            %q_proj = aten.slice(%qkv_proj, -1, 0, 4096)
            %k_proj = aten.slice(%qkv_proj, -1, 4096, 8192)
            %v_proj = aten.slice(%qkv_proj, -1, 8192, 12288)

gate_proj / up_proj become %gate_up_proj alike, and so do ``atom.weight_only_linear`` siblings (W4A16). Siblings
are GEMMs with the same activation inputs and the same formats; their weights (codes, scales, outliers,
outlier scales, bias) are stacked along the output rows once, here. The slices keep the old node names, so
everything downstream (RoPE, the KV store, SiLU*mul) reads them as before.

Why: at decode a small-M GEMM launch costs a fixed latency chain that dwarfs its bytes (docs/notes_gemm.md),
and the siblings share one quantized activation, so one launch does the work of three (two).

Every output column is computed exactly as before: the reference sums each group's integer products and
applies the scales column by column, in an order that does not depend on how many rows the weight has.
The results are bit-identical (tests use torch.equal).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .base import AtomPass, PassResult, add_attr, aten, atom, delete_attr_if_unused, get_attr_tensor, joined_name

# op -> (index of the first of its four weight arguments, index of its bias argument)
_WEIGHT_ARGS = {atom.quant_linear.default: (4, 8), atom.weight_only_linear.default: (1, 5)}
_WEIGHT_SUFFIXES = ("wq", "ws", "wo", "wos")


def _sibling_key(node: fx.Node):
    """Nodes with equal keys compute different rows of one GEMM; None for nodes that cannot be fused."""
    if node.target not in _WEIGHT_ARGS:
        return None
    first, bias_at = _WEIGHT_ARGS[node.target]
    weights, bias = node.args[first:first + 4], node.args[bias_at]
    if not all(isinstance(w, fx.Node) and w.op == "get_attr" for w in weights):
        return None
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return None
    return node.target, node.args[:first], node.args[bias_at + 1:], bias is None


class FuseSiblingGemms(AtomPass):
    requires = frozenset({"fused_gemm"})
    provides = frozenset({"fused_siblings"})

    def call(self, gm: fx.GraphModule) -> PassResult:
        groups: dict = {}
        for node in gm.graph.nodes:
            key = _sibling_key(node)
            if key is not None:
                groups.setdefault(key, []).append(node)
        modified = False
        for siblings in groups.values():
            if len(siblings) > 1:
                self._fuse(gm, siblings)
                modified = True
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

    def _fuse(self, gm: fx.GraphModule, siblings: list[fx.Node]) -> None:
        first, bias_at = _WEIGHT_ARGS[siblings[0].target]
        name = joined_name([s.name for s in siblings])
        head = siblings[0]
        rows = [get_attr_tensor(gm, s.args[first]).shape[0] for s in siblings]
        stacked = []
        for i, suffix in enumerate(_WEIGHT_SUFFIXES + ("bias",)):
            at = bias_at if suffix == "bias" else first + i
            if head.args[at] is None:
                stacked.append(None)
                continue
            value = torch.cat([get_attr_tensor(gm, s.args[at]) for s in siblings], dim=0)
            stacked.append(add_attr(gm, head, f"{name}_{suffix}", value))
        args = list(head.args)
        args[first:first + 4] = stacked[:4]
        args[bias_at] = stacked[4]
        with gm.graph.inserting_before(head):
            fused = gm.graph.create_node("call_function", head.target, tuple(args), name=name)
        fused.meta["atom.input_perm"] = head.meta.get("atom.input_perm")
        fused.meta["atom.fused_from"] = [s.name for s in siblings]
        start = 0
        for s, n in zip(siblings, rows, strict=True):
            old = [a for a in (*s.args[first:first + 4], s.args[bias_at]) if a is not None]
            s.target = aten.slice.Tensor  # rewritten in place: the node keeps its name and its users
            s.args = (fused, -1, start, start + n)
            s.meta.pop("atom.input_perm", None)
            s.meta.pop("tensor_meta", None)
            start += n
            for w in old:
                if not w.users:
                    gm.graph.erase_node(w)
                    delete_attr_if_unused(gm, w.target)
