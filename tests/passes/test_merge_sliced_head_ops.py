import pytest
import torch

from atom_compile.passes import MergeSlicedHeadOps
from atom_compile.passes.base import joined_name
from harness import check_pass, run_prefix


@pytest.mark.parametrize("kv_rotation", [True, False])
def test_q_and_k_head_ops_run_once(layer_graph, make_ctx, real_layer, kv_rotation):
    """RoPE of q and k (and their Hadamard rotation, with kv_rotation) on the fused qkv output become one call
    each over the q|k columns; the layer's output is bit-identical (rule "exact": torch.equal)."""
    ctx = make_ctx(make_ctx("atom-w4a4-rtn").config.replace(kv_rotation=kv_rotation))
    gm = run_prefix(layer_graph, ctx, MergeSlicedHeadOps)
    rot = 1 if kv_rotation else 0
    _, after, modified = check_pass(MergeSlicedHeadOps, gm, ctx, real_layer["inputs"],
                                    ops_before={"atom.rope": 2, "atom.hadamard_heads": 2 * rot},
                                    ops_after={"atom.rope": 1, "atom.hadamard_heads": rot})
    assert modified
    nodes = {n.name: n for n in after.graph.nodes}
    d = ctx.arch.head_dim
    nq, nk = ctx.arch.num_heads * d, ctx.arch.num_kv_heads * d
    assert nodes["qk_proj"].args[1:] == (-1, 0, nq + nk) and nodes["qk_rope"].args[0] is nodes["qk_proj"]
    q, k = ("q_rot", "k_rot") if kv_rotation else ("q_rope", "k_rope")
    assert nodes[q].args[1:] == (-1, 0, nq) and nodes[k].args[1:] == (-1, nq, nq + nk)
    assert "q_proj" not in nodes and "k_proj" not in nodes  # the old input slices have no users left


def test_slices_that_are_not_adjacent_stay_apart(layer_graph, make_ctx, real_layer):
    """Only adjacent, head-aligned ranges merge: with k's range moved one head away from q's, nothing changes."""
    ctx = make_ctx(make_ctx("atom-w4a4-rtn").config.replace(kv_rotation=False))
    gm = run_prefix(layer_graph, ctx, MergeSlicedHeadOps)
    k = next(n for n in gm.graph.nodes if n.name == "k_proj")
    d = ctx.arch.head_dim
    k.args = (k.args[0], -1, k.args[2] + d, k.args[3] + d)  # reads v's first head too: still a valid slice
    gm.recompile()
    assert not MergeSlicedHeadOps(ctx).call(gm).modified


def test_joined_names():
    """The names both passes give the nodes that do the work of several."""
    assert joined_name(["q_proj", "k_proj", "v_proj"]) == "qkv_proj"
    assert joined_name(["gate_proj", "up_proj"]) == "gate_up_proj"
    assert joined_name(["q_rope", "k_rope"]) == "qk_rope"
    assert joined_name(["a", "b"]) == "a_b"
