"""MergeSlicedHeadOps: a per-head op applied to adjacent slices of one tensor runs once, on their union.

Requires: {"fused_siblings"}
Provides: {"merged_head_ops"}

After FuseSiblingGemms, q and k are neighbouring column ranges of one GEMM output, and RoPE (same cos / sin) and the
per-head Hadamard rotation (same head size) treat every head alike, so each pair becomes one launch:

    Before: %q_proj = aten.slice(%qkv_proj, -1, 0, 4096);   %k_proj = aten.slice(%qkv_proj, -1, 4096, 8192)
            %q_rope = atom.rope(%q_proj, %cos, %sin);        %k_rope = atom.rope(%k_proj, %cos, %sin)
            %q_rot = atom.hadamard_heads(%q_rope, 128);      %k_rot = atom.hadamard_heads(%k_rope, 128)
    After:  %qk_proj = aten.slice(%qkv_proj, -1, 0, 8192)
            %qk_rope = atom.rope(%qk_proj, %cos, %sin)
            %q_rope = aten.slice(%qk_rope, -1, 0, 4096);     %k_rope = aten.slice(%qk_rope, -1, 4096, 8192)
            %qk_rot = atom.hadamard_heads(%qk_rope_1, 128) with %qk_rope_1 = aten.slice(%qk_rope, -1, 0, 8192)
            %q_rot = aten.slice(%qk_rot, -1, 0, 4096);       %k_rot = aten.slice(%qk_rot, -1, 4096, 8192)

Only head-aligned, adjacent ranges of the same tensor merge. The ops compute each head on its own, so the results
are bit-identical (tests use torch.equal); at decode each launch saved is a few microseconds of fixed cost.
"""

from __future__ import annotations

import torch.fx as fx

from .base import AtomPass, PassResult, aten, atom, joined_name

# ops that treat every head alike; calls merge when the arguments after the tensor are the same nodes / values
_HEAD_OPS = (atom.rope.default, atom.hadamard_heads.default)


def _slice_of(node: fx.Node):
    """(base, start, end) if ``node`` is a last-dim slice, else None."""
    if isinstance(node, fx.Node) and node.target == aten.slice.Tensor and len(node.args) == 4 and node.args[1] == -1:
        return node.args[0], node.args[2], node.args[3]
    return None


class MergeSlicedHeadOps(AtomPass):
    requires = frozenset({"fused_siblings"})
    provides = frozenset({"merged_head_ops"})

    def call(self, gm: fx.GraphModule) -> PassResult:
        head_dim = self.ctx.arch.head_dim
        modified = False
        for op in _HEAD_OPS:  # RoPE first: its merged output's slices are what the Hadamard reads
            groups: dict = {}
            for node in gm.graph.nodes:
                sl = _slice_of(node.args[0]) if node.target == op else None
                if sl is not None and sl[1] % head_dim == 0 and sl[2] % head_dim == 0:
                    groups.setdefault((sl[0], node.args[1:]), []).append((sl[1], sl[2], node))
            for calls in groups.values():
                calls.sort(key=lambda c: c[0])
                run = [calls[0]]
                for c in calls[1:] + [None]:
                    if c is not None and c[0] == run[-1][1]:
                        run.append(c)
                        continue
                    if len(run) > 1:
                        self._merge(gm, run)
                        modified = True
                    run = [c]
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

    @staticmethod
    def _merge(gm: fx.GraphModule, run: list) -> None:
        nodes = [n for _, _, n in run]
        start, end = run[0][0], run[-1][1]
        base = run[0][2].args[0].args[0]
        first = next(n for n in gm.graph.nodes if n in nodes)  # the merged op goes where the first call was
        name = joined_name([n.name for n in nodes])
        with gm.graph.inserting_before(first):
            union = gm.graph.create_node("call_function", aten.slice.Tensor, (base, -1, start, end),
                                         name=joined_name([n.args[0].name for n in nodes]))
            merged = gm.graph.create_node("call_function", first.target, (union, *first.args[1:]), name=name)
        merged.meta.update({k: v for k, v in first.meta.items() if k.startswith("atom.")})
        for s, e, n in run:
            old_input = n.args[0]
            n.target = aten.slice.Tensor  # rewritten in place: the node keeps its name and its users
            n.args = (merged, -1, s - start, e - start)
            n.meta.pop("tensor_meta", None)
            if not old_input.users:
                gm.graph.erase_node(old_input)
