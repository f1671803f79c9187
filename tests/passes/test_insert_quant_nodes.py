import pytest
import torch

import atom_compile
from atom_compile import quant
from atom_compile.passes import InsertQuantNodes, OutlierAnalysis, ReorderChannels
from harness import check_pass, run_prefix

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("config", ["atom-w4a4-rtn", "rtn-w4a4", "w8a8"])
def test_matches_the_fake_quant_reference(layer_graph, make_ctx, real_layer, config):
    ctx = make_ctx(config)
    gm = run_prefix(layer_graph, ctx, InsertQuantNodes)
    _, after, modified = check_pass(
        InsertQuantNodes, gm, ctx, real_layer["inputs"],
        ops_after={"atom.quantize_act": 4, "atom.dequantize_act": 4, "atom.dequantize_weight": 7, "aten.linear": 7},
    )
    assert modified
    for name in LINEARS:  # the float weights are gone, the packed ones are there
        assert not hasattr(after, f"{name}_weight")
        assert getattr(after, f"{name}_wq").dtype == torch.int8


def test_config_knobs_reach_the_graph(layer_graph, make_ctx, real_layer):
    cfg = atom_compile.get_config("atom-w4a4-rtn", group_size=64, n_outliers=64, act_clip=0.8, weight_channel_group=2,
                                  outlier_format="fp16", weight_format="int3", act_format="int3")
    ctx = make_ctx(cfg)
    gm = run_prefix(layer_graph, ctx, InsertQuantNodes)
    _, after, _ = check_pass(InsertQuantNodes, gm, ctx, real_layer["inputs"])
    q = next(n for n in after.graph.nodes if n.name == "input_layernorm_quant")
    assert q.args[1:] == ("int3", 64, 64, "fp16", 0.8)
    assert after.q_proj_ws.shape == (576 // 2, (576 - 64) // 64)  # two rows share a scale
    assert after.q_proj_wo.dtype == torch.float32  # fp16-format outliers stay in the model dtype


def test_weight_only(layer_graph, make_ctx, real_layer):
    ctx = make_ctx("w4a16", calibration=False)
    gm = run_prefix(layer_graph, ctx, InsertQuantNodes)
    check_pass(InsertQuantNodes, gm, ctx, real_layer["inputs"],
               ops_after={"atom.quantize_act": 0, "atom.dequantize_weight": 7, "aten.linear": 7})


def test_fp_config_changes_nothing(layer_graph, make_ctx):
    ctx = make_ctx("fp", calibration=False)
    gm = run_prefix(layer_graph, ctx, InsertQuantNodes)
    code = gm.code
    result = InsertQuantNodes(ctx).call(gm)
    assert not result.modified and result.graph_module.code == code


def test_gptq_lowers_the_layerwise_error(layer_graph, make_ctx, real_layer):
    """GPTQ must beat round-to-nearest on its own objective tr((W - Q) H (W - Q)^T) for every linear."""
    ctx = make_ctx("atom-w4a4")
    gm = ReorderChannels(ctx).call(OutlierAnalysis(ctx).call(layer_graph).graph_module).graph_module
    W = {n: getattr(gm, f"{n}_weight").clone() for n in LINEARS}
    H = {n.name: gm.meta["atom.input_hessians"][n.meta["atom.input_stats"]]
         for n in gm.graph.nodes if n.name in LINEARS}
    gptq = InsertQuantNodes(ctx).call(gm).graph_module
    for name in LINEARS:
        spec = ctx.config.resolve(W[name].shape[1])
        deq_gptq = quant.dequantize_rows(*(getattr(gptq, f"{name}_{s}") for s in ("wq", "ws", "wo", "wos")),
                                         spec.weight_format, spec.group_size, spec.outlier_format)
        deq_rtn = quant.dequantize_rows(
            *quant.quantize_rows(W[name], spec.weight_format, spec.group_size, spec.n_outliers,
                                 spec.outlier_format, spec.weight_clip),
            spec.weight_format, spec.group_size, spec.outlier_format)

        def err(deq):
            d = (W[name] - deq).double()
            return torch.trace(d @ H[name] @ d.t()).item()

        assert err(deq_gptq) < 0.9 * err(deq_rtn), f"{name}: GPTQ error {err(deq_gptq):.4g} vs RTN {err(deq_rtn):.4g}"
