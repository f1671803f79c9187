import pytest
import torch

from atom_compile.passes import FuseSiblingGemms
from harness import check_pass, run_prefix


@pytest.mark.parametrize("config", ["atom-w4a4-rtn", "w8a8", "w4a16"])
def test_siblings_become_one_gemm_with_identical_results(layer_graph, make_ctx, real_layer, config):
    """q/k/v -> qkv_proj, gate/up -> gate_up_proj; o_proj and down_proj read other inputs and stay alone.
    The layer's output is bit-identical (rule "exact": torch.equal)."""
    ctx = make_ctx(config, calibration=config.startswith("atom"))
    gemm = "atom.weight_only_linear" if config == "w4a16" else "atom.quant_linear"
    gm = run_prefix(layer_graph, ctx, FuseSiblingGemms)
    before, after, modified = check_pass(FuseSiblingGemms, gm, ctx, real_layer["inputs"],
                                         ops_before={gemm: 7, "aten.slice": 0},
                                         ops_after={gemm: 4, "aten.slice": 5})
    assert modified
    nodes = {n.name: n for n in after.graph.nodes}
    assert nodes["qkv_proj"].meta["atom.fused_from"] == ["q_proj", "k_proj", "v_proj"]
    assert nodes["gate_up_proj"].meta["atom.fused_from"] == ["gate_proj", "up_proj"]
    # the slices keep the old names and cover the fused rows in order, without gaps
    ends = [nodes[n].args[2:] for n in ("q_proj", "k_proj", "v_proj")]
    assert ends[0][0] == 0 and ends[0][1] == ends[1][0] and ends[1][1] == ends[2][0]
    assert ends[2][1] == getattr(after, "qkv_proj_wq").shape[0]
    # the stacked weights are the old ones, row blocks in order; the old attributes are gone
    for suffix in ("wq", "ws", "wo", "wos"):
        stacked = torch.cat([getattr(before, f"{p}_{suffix}") for p in ("gate_proj", "up_proj")])
        assert torch.equal(getattr(after, f"gate_up_proj_{suffix}"), stacked)
        assert not hasattr(after, f"q_proj_{suffix}") and hasattr(after, f"o_proj_{suffix}")


def test_gemms_with_different_formats_stay_apart(layer_graph, make_ctx, real_layer):
    """Siblings must agree on everything but their weights: a GEMM with other formats is not fused."""
    ctx = make_ctx("atom-w4a4-rtn")
    gm = run_prefix(layer_graph, ctx, FuseSiblingGemms)
    k = next(n for n in gm.graph.nodes if n.name == "k_proj")
    k.args = (*k.args[:-1], torch.float64)  # another output dtype than q_proj / v_proj
    gm.recompile()
    after = FuseSiblingGemms(ctx).call(gm).graph_module
    names = {n.name: n for n in after.graph.nodes}
    assert names["qv_proj"].meta["atom.fused_from"] == ["q_proj", "v_proj"]
    assert names["k_proj"].target == torch.ops.atom.quant_linear.default


def test_biases_are_stacked_too(layer_graph, make_ctx, real_layer):
    """Models with attention biases (Qwen2-style q/k/v biases): the biases are stacked with the weights and the
    results stay bit-identical. Biases attached here to SmolLM2's GEMMs, which have none."""
    from atom_compile.passes.base import add_attr

    ctx = make_ctx("atom-w4a4-rtn")
    gm = run_prefix(layer_graph, ctx, FuseSiblingGemms)
    g = torch.Generator().manual_seed(3)
    for node in list(gm.graph.nodes):
        if node.name in ("q_proj", "k_proj", "v_proj"):
            rows = getattr(gm, node.args[4].target).shape[0]
            bias = add_attr(gm, node, f"{node.name}_bias", torch.randn(rows, generator=g))
            node.args = (*node.args[:8], bias, *node.args[9:])
    gm.recompile()
    before, after, _ = check_pass(FuseSiblingGemms, gm, ctx, real_layer["inputs"],
                                  ops_after={"atom.quant_linear": 4, "aten.slice": 5})
    stacked = torch.cat([getattr(before, f"{p}_bias") for p in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(after.qkv_proj_bias, stacked) and not hasattr(after, "q_proj_bias")
