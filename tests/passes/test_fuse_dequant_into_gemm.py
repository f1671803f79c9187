import pytest

from atom_compile.passes import FuseDequantIntoGemm
from harness import check_pass, run_prefix


@pytest.mark.parametrize("config", ["atom-w4a4-rtn", "w8a8"])
def test_fused_gemm_equals_dequant_then_matmul(layer_graph, make_ctx, real_layer, config):
    ctx = make_ctx(config)
    gm = run_prefix(layer_graph, ctx, FuseDequantIntoGemm)
    _, after, modified = check_pass(
        FuseDequantIntoGemm, gm, ctx, real_layer["inputs"],
        ops_before={"aten.linear": 7, "atom.dequantize_weight": 7, "atom.dequantize_act": 4},
        ops_after={"atom.quant_linear": 7, "aten.linear": 0, "atom.dequantize_weight": 0, "atom.dequantize_act": 0},
    )
    assert modified
    names = [n.name for n in after.graph.nodes if n.op == "call_function"]
    assert "q_proj" in names and "down_proj" in names  # fused nodes keep the linears' names


def test_weight_only_gemm(layer_graph, make_ctx, real_layer):
    ctx = make_ctx("w4a16", calibration=False)
    gm = run_prefix(layer_graph, ctx, FuseDequantIntoGemm)
    check_pass(FuseDequantIntoGemm, gm, ctx, real_layer["inputs"],
               ops_after={"atom.weight_only_linear": 7, "aten.linear": 0, "atom.dequantize_weight": 0})
