"""The reference ops against straightforward float re-computations, on random inputs with large outliers."""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from atom_compile import ops, quant
from fake_quant import fake_quant_groups, fake_quant_kv

atom = torch.ops.atom


def with_outliers(*shape, seed, scale=30.0, frac=0.02):
    """Gaussian data with a few channels (last dim) blown up, as real LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    n = max(1, int(shape[-1] * frac))
    cols = torch.randperm(shape[-1], generator=g)[:n]
    x[..., cols] *= scale
    return x


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("fmt", ["int4", "int3", "int8", "fp4"])
@pytest.mark.parametrize("group", [128, 64])
def test_quantize_rows_matches_fake_quant(fmt, group):
    x = with_outliers(37, 576, seed=1)
    n = 64
    q, s, o, os_ = quant.quantize_rows(x, fmt, group, n, "int8", 0.9)
    deq = quant.dequantize_rows(q, s, o, os_, fmt, group, "int8")
    assert q.shape[-1] == (576 - n) // (2 if quant.is_packed(fmt) else 1)
    expect = torch.cat([fake_quant_groups(x[:, :-n], fmt, group, 0.9), fake_quant_groups(x[:, -n:], "int8", n, 1.0)], -1)
    torch.testing.assert_close(deq, expect, rtol=0, atol=0)
    # error bound: half a step inside the clip range
    step = s.repeat_interleave(group, dim=-1)
    inside = x[:, :-n].abs() <= step * (-quant.int_range(fmt)[0] - 1)
    if fmt != "fp4":
        assert torch.all((deq[:, :-n] - x[:, :-n]).abs()[inside] <= step[inside] / 2 * (1 + 1e-6))


def test_pack_roundtrip_and_layout():
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(-8, 8, (5, 256), generator=g, dtype=torch.int8)
    packed = quant.pack_nibbles(codes, 128)
    assert packed.shape == (5, 128) and torch.equal(quant.unpack_nibbles(packed, 128).to(torch.int8), codes)
    # byte j of a group: element j in the low nibble, element j + 64 in the high nibble
    b = packed[0, 3].item() & 0xFF
    assert ((b & 0xF) ^ 8) - 8 == codes[0, 3] and ((b >> 4) ^ 8) - 8 == codes[0, 67]


def test_fp4_rounding_is_nearest_with_ties_to_even():
    v = torch.tensor([0.24, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -0.75, -5.0])
    units = quant.round_to_grid(v * 2, "fp4")  # the grid in half-units
    expect = torch.tensor([0, 0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -1.0, -4.0]) * 2
    assert torch.equal(units.float(), expect)


@pytest.mark.parametrize("a_fmt,w_fmt,group,n_out,o_fmt", [
    ("int4", "int4", 128, 64, "int8"), ("int4", "int4", 64, 128, "int8"), ("int8", "int8", 576, 0, "int8"),
    ("int3", "int3", 128, 64, "fp16"), ("fp4", "fp4", 128, 64, "int8"), ("int4", "int4", 512, 64, "int8"),
])
def test_quant_linear_against_float_recomputation(a_fmt, w_fmt, group, n_out, o_fmt):
    x = with_outliers(3, 11, 576, seed=3)
    w = torch.randn(200, 576, generator=torch.Generator().manual_seed(4)) * 0.05
    xq = quant.quantize_rows(x, a_fmt, group, n_out, o_fmt, 0.9)
    wq = quant.quantize_rows(w, w_fmt, group, n_out, o_fmt, 0.85)
    y = atom.quant_linear(*xq, *wq, None, a_fmt, w_fmt, group, o_fmt, 1, torch.float32)
    xd = quant.dequantize_rows(*xq, a_fmt, group, o_fmt, dtype=torch.float64)
    wd = quant.dequantize_rows(*wq, w_fmt, group, o_fmt, dtype=torch.float64)
    ref = xd @ wd.t()
    assert y.shape == (3, 11, 200)
    assert rel_err(y, ref) < 1e-6


def test_quant_linear_bias_and_channel_groups():
    x = with_outliers(16, 256, seed=5)
    w = torch.randn(64, 256) * 0.1
    b = torch.randn(64)
    xq = quant.quantize_rows(x, "int4", 64, 64, "int8", 1.0)
    wq = quant.quantize_rows(w, "int4", 64, 64, "int8", 1.0, rows_per_scale=4)
    assert wq[1].shape == (16, 3)
    y = atom.quant_linear(*xq, *wq, b, "int4", "int4", 64, "int8", 4, torch.float32)
    ref = quant.dequantize_rows(*xq, "int4", 64, "int8", dtype=torch.float64) @ \
        quant.dequantize_rows(*wq, "int4", 64, "int8", 4, dtype=torch.float64).t() + b.double()
    assert rel_err(y, ref) < 1e-6


def test_integer_accumulation_is_exact():
    """Worst-case codes: every group sum is an exact integer (int32 semantics)."""
    xq = quant.pack_nibbles(torch.full((2, 256), -8, dtype=torch.int8), 128)
    wq = quant.pack_nibbles(torch.full((3, 256), -8, dtype=torch.int8), 128)
    ones = torch.ones(2, 2), torch.ones(3, 2)
    empty_x, empty_w = torch.zeros(2, 0, dtype=torch.int8), torch.zeros(3, 0, dtype=torch.int8)
    y = atom.quant_linear(xq, ones[0], empty_x, torch.ones(2, 1), wq, ones[1], empty_w, torch.ones(3, 1),
                          None, "int4", "int4", 128, "int8", 1, torch.float32)
    assert torch.equal(y, torch.full((2, 3), 256 * 64.0))
    assert quant.exact_matmul_dtype(128, 8, 8) == torch.float32
    assert quant.exact_matmul_dtype(1536, 128, 128) == torch.float64


def test_weight_only_linear():
    x = torch.randn(4, 7, 576)
    w = torch.randn(96, 576) * 0.1
    wq = quant.quantize_rows(w, "int4", 64, 0, "int8", 1.0)
    y = atom.weight_only_linear(x, *wq, None, "int4", 64, "int8", 1)
    ref = x.double() @ fake_quant_groups(w, "int4", 64, 1.0).double().t()
    assert rel_err(y, ref) < 1e-6


def test_rms_norm_matches_transformers_and_fused_quant_is_exact():
    x = with_outliers(2, 9, 576, seed=6)
    norm = LlamaRMSNorm(576, eps=1e-5)
    norm.weight.data = torch.rand(576) + 0.5
    assert torch.equal(atom.rms_norm(x, norm.weight, 1e-5, None), norm(x))
    perm = torch.randperm(576)
    gathered = atom.rms_norm(x, norm.weight[perm], 1e-5, perm)
    assert torch.equal(gathered, norm(x)[..., perm])
    fused = atom.rms_norm_quant(x, norm.weight[perm], 1e-5, perm, "int4", 128, 64, "int8", 0.9)
    separate = atom.quantize_act(gathered, "int4", 128, 64, "int8", 0.9)
    assert all(torch.equal(a, b) for a, b in zip(fused, separate))
    g, u = with_outliers(3, 1536, seed=7), torch.randn(3, 1536)
    fused = atom.silu_mul_quant(g, u, "int4", 128, 128, "int8", 0.9)
    separate = atom.quantize_act(torch.nn.functional.silu(g) * u, "int4", 128, 128, "int8", 0.9)
    assert all(torch.equal(a, b) for a, b in zip(fused, separate))
    fused = atom.gather_quant(x, perm, "int4", 128, 64, "int8", 0.9)
    separate = atom.quantize_act(x[..., perm], "int4", 128, 64, "int8", 0.9)
    assert all(torch.equal(a, b) for a, b in zip(fused, separate))


def test_rope_matches_transformers():
    B, T, H, D = 2, 5, 3, 64
    x = torch.randn(B, T, H * D)
    pos = torch.arange(T).float()
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat([torch.outer(pos, inv)] * 2, -1)
    cos, sin = emb.cos().expand(B, T, D), emb.sin().expand(B, T, D)
    ref, _ = apply_rotary_pos_emb(x.view(B, T, H, D).transpose(1, 2), x.view(B, T, H, D).transpose(1, 2), cos, sin)
    assert torch.equal(atom.rope(x, cos, sin), ref.transpose(1, 2).reshape(B, T, H * D))


def _naive_attention(q, k, v, kv_lens):
    """float64 loops: query t of sequence b at position len-T+t, softmax over keys 0..pos, GQA by h // group."""
    B, T, HD = q.shape
    _, Hkv, S, D = k.shape
    Hq = HD // D
    out = torch.zeros(B, T, Hq, D, dtype=torch.float64)
    qh = q.double().view(B, T, Hq, D)
    for b in range(B):
        for t in range(T):
            pos = int(kv_lens[b]) - T + t
            for h in range(Hq):
                kh = k[b, h // (Hq // Hkv), : pos + 1].double()
                w = torch.softmax(kh @ qh[b, t, h] / math.sqrt(D), dim=0)
                out[b, t, h] = w @ v[b, h // (Hq // Hkv), : pos + 1].double()
    return out.view(B, T, HD)


@pytest.mark.parametrize("T", [1, 6])
def test_attention_over_cache_gqa_and_ragged_lengths(T):
    B, Hq, Hkv, D, S = 3, 6, 2, 64, 20
    g = torch.Generator().manual_seed(8)
    k_cache = torch.zeros(B, Hkv, S, D)
    v_cache = torch.zeros(B, Hkv, S, D)
    seqlens = torch.tensor([0, 5, 11], dtype=torch.int32)
    for b in range(B):  # earlier tokens already in the cache
        n = int(seqlens[b])
        k_cache[b, :, :n] = torch.randn(Hkv, n, D, generator=g)
        v_cache[b, :, :n] = torch.randn(Hkv, n, D, generator=g)
    k = torch.randn(B, T, Hkv * D, generator=g)
    v = torch.randn(B, T, Hkv * D, generator=g)
    q = torch.randn(B, T, Hq * D, generator=g)
    lens = atom.kv_cache_store(k, v, k_cache, v_cache, seqlens)
    assert lens.tolist() == (seqlens + T).tolist()
    out = atom.attention(q, k_cache, v_cache, lens)
    assert rel_err(out, _naive_attention(q, k_cache, v_cache, lens)) < 1e-6


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_kv_cache_roundtrip(bits):
    B, H, S, D, T = 2, 3, 16, 64, 7
    k = with_outliers(B, T, H * D, seed=9, scale=8.0)
    v = torch.randn(B, T, H * D)
    caches = [torch.zeros(B, H, S, D * bits // 8, dtype=torch.uint8), torch.zeros(B, H, S, 2, dtype=torch.float16)] * 2
    caches = [c.clone() for c in caches]
    seqlens = torch.tensor([0, 4], dtype=torch.int32)
    atom.kv_cache_store_quant(k, v, caches[0], caches[1], caches[2], caches[3], seqlens, bits, 1.0)
    for b in range(B):
        s0 = int(seqlens[b])
        got = ops.kv_cache_dequantize(caches[0], caches[1], bits, s0 + T)[b, :, s0:]
        expect = fake_quant_kv(k[b].view(T, H, D), bits, 1.0).transpose(0, 1)
        torch.testing.assert_close(got, expect, rtol=0, atol=0)
        scale = caches[1][b, :, s0 : s0 + T, 0].float().unsqueeze(-1)
        err = (got - k[b].view(T, H, D).transpose(0, 1)).abs()
        # half a step, except where rounding the zero point pushes the maximum past the top code: one step
        assert torch.all(err <= scale * (1 + 1e-3))
        assert (err <= scale / 2 * (1 + 1e-3)).float().mean() > 0.98
    codes = torch.randint(0, 2**bits, (4, 64), dtype=torch.uint8)
    assert torch.equal(quant.kv_unpack(quant.kv_pack(codes, bits), bits), codes)


def test_attention_quant_kv_equals_attention_over_dequantized_cache():
    B, Hq, Hkv, D, T = 2, 6, 2, 64, 9
    q, k, v = torch.randn(B, T, Hq * D), torch.randn(B, T, Hkv * D), torch.randn(B, T, Hkv * D)
    qc = [torch.zeros(B, Hkv, T, D // 2, dtype=torch.uint8), torch.zeros(B, Hkv, T, 2, dtype=torch.float16),
          torch.zeros(B, Hkv, T, D // 2, dtype=torch.uint8), torch.zeros(B, Hkv, T, 2, dtype=torch.float16)]
    lens = atom.kv_cache_store_quant(k, v, *qc, torch.zeros(B, dtype=torch.int32), 4, 1.0)
    out = atom.attention_quant_kv(q, *qc, lens, 4)
    kd = ops.kv_cache_dequantize(qc[0], qc[1], 4, T)
    vd = ops.kv_cache_dequantize(qc[2], qc[3], 4, T)
    assert rel_err(out, _naive_attention(q, kd, vd, lens)) < 1e-6


def test_cache_overflow_is_a_clear_error():
    k = torch.randn(1, 5, 64)
    with pytest.raises(ValueError, match="KV cache overflow"):
        atom.kv_cache_store(k, k, torch.zeros(1, 1, 4, 64), torch.zeros(1, 1, 4, 64), torch.zeros(1, dtype=torch.int32))


def test_mse_clip_search_never_loses_to_a_fixed_clip():
    w = with_outliers(64, 256, seed=11, scale=5.0) * 0.05
    for fixed in (1.0, 0.85):
        err_fixed = (quant.dequantize_rows(*quant.quantize_rows(w, "int4", 64, 0, "int8", fixed), "int4", 64, "int8")
                     - w).pow(2).reshape(64, 4, 64).sum(-1)
        err_mse = (quant.dequantize_rows(*quant.quantize_rows(w, "int4", 64, 0, "int8", 1.0, clip_search=True),
                                         "int4", 64, "int8") - w).pow(2).reshape(64, 4, 64).sum(-1)
        assert torch.all(err_mse <= err_fixed + 1e-12)  # 1.0 and 0.85 are both on the search grid
    assert err_mse.sum() < 0.97 * err_fixed.sum()
