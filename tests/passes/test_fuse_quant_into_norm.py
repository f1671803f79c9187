import pytest

from atom_compile.passes import FuseQuantIntoNorm
from harness import check_pass, run_prefix


@pytest.mark.parametrize("config", ["atom-w4a4-rtn", "rtn-w4a4"])
def test_fusion_is_bit_exact(layer_graph, make_ctx, real_layer, config):
    ctx = make_ctx(config)
    gm = run_prefix(layer_graph, ctx, FuseQuantIntoNorm)
    reordered = config == "atom-w4a4-rtn"
    _, after, modified = check_pass(
        FuseQuantIntoNorm, gm, ctx, real_layer["inputs"],
        ops_before={"atom.quantize_act": 4, "atom.rms_norm": 2, "aten.silu": 1, "aten.mul": 1,
                    "aten.index_select": int(reordered)},
        ops_after={"atom.quantize_act": int(not reordered), "atom.rms_norm_quant": 2, "atom.silu_mul_quant": 1,
                   "atom.gather_quant": int(reordered), "atom.rms_norm": 0, "aten.silu": 0, "aten.mul": 0,
                   "aten.index_select": 0},
    )
    assert modified


def test_nothing_to_fuse_without_activation_quantization(layer_graph, make_ctx):
    ctx = make_ctx("w4a16", calibration=False)
    gm = run_prefix(layer_graph, ctx, FuseQuantIntoNorm)
    assert not FuseQuantIntoNorm(ctx).call(gm).modified
