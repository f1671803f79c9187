import torch

from atom_compile.passes import OutlierAnalysis, ReorderChannels
from harness import check_pass, run_layer, run_prefix


def test_reorder_preserves_the_layer(layer_graph, make_ctx, real_layer):
    ctx = make_ctx("atom-w4a4-rtn")
    gm = run_prefix(layer_graph, ctx, ReorderChannels)
    _, after, modified = check_pass(
        ReorderChannels, gm, ctx, real_layer["inputs"],
        ops_before={"aten.index_select": 0, "atom.rms_norm": 2},
        ops_after={"aten.index_select": 1, "atom.rms_norm": 2, "aten.linear": 7},
    )
    assert modified


def test_weights_are_exact_permutations(layer_graph, make_ctx, real_layer):
    ctx = make_ctx("atom-w4a4-rtn")
    original = {k: v.clone() for k, v in layer_graph.named_buffers()}
    gm = OutlierAnalysis(ctx).call(layer_graph).graph_module
    orders = gm.meta["atom.outlier_order"]
    gm = ReorderChannels(ctx).call(gm).graph_module
    p_in, p_attn, p_post, p_mlp = (orders[k] for k in ("input_layernorm", "attention", "post_attention_layernorm", "mlp_act"))
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(gm, f"{name}_weight"), original[f"{name}_weight"][:, p_in])
    assert torch.equal(getattr(gm, "o_proj_weight"), original["o_proj_weight"][:, p_attn])
    for name in ("gate_proj", "up_proj"):  # rows follow down_proj's input order, columns the norm's
        assert torch.equal(getattr(gm, f"{name}_weight"), original[f"{name}_weight"][p_mlp][:, p_post])
    assert torch.equal(getattr(gm, "down_proj_weight"), original["down_proj_weight"][:, p_mlp])
    assert torch.equal(getattr(gm, "input_layernorm_weight"), original["input_layernorm_weight"][p_in])


def test_norm_gathers_its_output_exactly(layer_graph, make_ctx, real_layer):
    """The reordered norm emits exactly the original norm's values in the new order (torch.equal)."""
    ctx = make_ctx("atom-w4a4-rtn")
    captured = {}

    class Capture(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name == "input_layernorm":
                captured.setdefault(self.tag, out)
            return out

    def norm_output(gm, tag):
        def make(g):
            c = Capture(g)
            c.tag = tag
            return c
        run_layer(gm, real_layer["inputs"], make)
        return captured[tag]

    before = norm_output(layer_graph, "before")
    gm = ReorderChannels(ctx).call(OutlierAnalysis(ctx).call(layer_graph).graph_module).graph_module
    after = norm_output(gm, "after")
    assert torch.equal(after, before[..., gm.meta["atom.outlier_order"]["input_layernorm"]])


def test_no_outliers_no_change(layer_graph, make_ctx):
    ctx = make_ctx("rtn-w4a4", calibration=False)
    gm = OutlierAnalysis(ctx).call(layer_graph).graph_module
    code = gm.code
    result = ReorderChannels(ctx).call(gm)
    assert not result.modified and result.graph_module.code == code
