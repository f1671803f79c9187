"""The dequant backend (lowering/dequant.py): the reference quantizers with float GEMMs of dequantized operands.

Stated bounds: one GEMM within 1e-6 relative of quant_linear_reference in float32 (the float sums run in
another order; measured 3e-7 on SmolLM2 shapes); a whole compiled model within 1e-12 in float64, where
no 4-bit code can flip between the two.
"""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import atom_compile
from atom_compile import quant
from atom_compile.lowering import relower
from atom_compile.ops import quant_linear_reference, weight_only_linear_reference
from atom_compile.lowering.dequant import DequantLinear


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("M,N,K,g,n_out", [(37, 96, 576, 64, 64), (16, 80, 1536, 128, 128)])
def test_gemm_matches_reference(M, N, K, g, n_out):
    gen = torch.Generator().manual_seed(M + K)
    x = torch.randn(M, K, generator=gen)
    x[:, -n_out:] *= 20
    w = torch.randn(N, K, generator=gen) * 0.05
    b = torch.randn(N, generator=gen)
    xq = quant.quantize_rows(x, "int4", g, n_out, "int8", 0.9)
    wq = quant.quantize_rows(w, "int4", g, n_out, "int8", 0.85)
    formats = ("int4", "int4", g, "int8", 1, torch.float32)
    ref = quant_linear_reference(*xq, *wq, b, *formats)
    wformats = ("int4", g, "int8", 1)
    out = DequantLinear("t", wq, wformats, quantized_acts=True)(*xq, *wq, b, *formats)
    assert out.dtype == torch.float32 and _rel(out, ref) < 1e-6
    # weight-only (W4A16): the reference dequantizes the weight on every call, the same values
    ref = weight_only_linear_reference(x, *wq, b, "int4", g, "int8", 1)
    out = DequantLinear("t", wq, wformats, quantized_acts=False)(x, *wq, b, "int4", g, "int8", 1)
    assert _rel(out, ref) < 1e-6


@pytest.mark.parametrize("config", ["atom-w4a4-rtn", "w4a16"])
def test_model_matches_reference_in_float64(config):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64)
    model = LlamaForCausalLM(cfg).eval().double()
    acfg = atom_compile.get_config(config, group_size=64, n_outliers=64 if config != "w4a16" else 0)
    ref = atom_compile.compile(model, torch.randint(0, 64, (2, 16)), acfg, progress=False, backend="reference")
    deq = copy.deepcopy(ref)
    for gm in deq.layers:
        relower(gm, "dequant")  # in place
    table = {row[0]: row[2] for row in deq.layers[0].meta["atom.kernel_table"]}
    assert table["qkv_proj"] == "dequant:float_gemm"
    ids = torch.randint(0, 64, (2, 12))
    a, b = ref(ids), deq(ids)
    assert _rel(b, a) < 1e-12
