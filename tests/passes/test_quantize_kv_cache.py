import pytest
import torch

from atom_compile.passes import QuantizeKVCache
from harness import check_pass, run_prefix


@pytest.mark.parametrize("bits", [4, 2, 8])
def test_matches_fake_quant_kv(layer_graph, make_ctx, real_layer, bits):
    ctx = make_ctx(make_ctx("fp", calibration=False).config.replace(kv_bits=bits), calibration=False)
    gm = run_prefix(layer_graph, ctx, QuantizeKVCache)
    _, after, modified = check_pass(
        QuantizeKVCache, gm, ctx, real_layer["inputs"],
        ops_before={"atom.kv_cache_store": 1, "atom.attention": 1},
        ops_after={"atom.kv_cache_store_quant": 1, "atom.attention_quant_kv": 1, "atom.kv_cache_store": 0,
                   "atom.attention": 0},
    )
    assert modified
    spec = dict((name, (dt, last)) for name, dt, last in after.meta["atom.kv_cache_spec"])
    assert spec == {"k_cache": ("uint8", 64 * bits // 8), "v_cache": ("uint8", 64 * bits // 8),
                    "k_params": ("float16", 2), "v_params": ("float16", 2)}
    placeholders = [n.name for n in after.graph.nodes if n.op == "placeholder"]
    assert placeholders[-4:] == ["k_cache", "v_cache", "k_params", "v_params"]


def test_after_full_quantization(layer_graph, make_ctx, real_layer):
    ctx = make_ctx("atom-w4a4-rtn")
    gm = run_prefix(layer_graph, ctx, QuantizeKVCache)
    check_pass(QuantizeKVCache, gm, ctx, real_layer["inputs"])


def test_kv_off(layer_graph, make_ctx):
    ctx = make_ctx("w8a8", calibration=False)
    gm = run_prefix(layer_graph, ctx, QuantizeKVCache)
    assert not QuantizeKVCache(ctx).call(gm).modified
    assert torch.ops.atom.kv_cache_store.default in {n.target for n in gm.graph.nodes}
