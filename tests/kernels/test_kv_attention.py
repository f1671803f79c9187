"""The Triton 4-bit KV cache kernels against their reference ops (atom_compile/ops.py).

Runs under TRITON_INTERPRET=1 on the CPU (tests/conftest.py sets it) and natively on a CUDA device. The
references run on the CPU (the project's definition: torch's CUDA kernels divide by a Python scalar as a
multiply by its reciprocal, which can move a KV scale by one fp16 ulp).

Stated bounds:
- kv_cache_store_quant: codes, params and returned lengths bit-exact, untouched slots unchanged.
- attention_quant_kv: ||out - ref|| / ||ref|| < 1e-5 for fp32 inputs; < 1e-2 for bf16 / fp16 inputs
  (the output is rounded to 8 / 11 bits; on a GPU P is also rounded to fp16 for the P.V dot). The same bound
  for the dense prefill path (K/V rounded to q's dtype, then torch SDPA).
- kv_dequantize: bit-exact (the reference's fp32 dequantization rounded to the output dtype).
"""

import pytest
import torch

from atom_compile import ops
from atom_compile.runtime_kernels import kv_attention
from atom_compile.runtime_kernels.kv_attention import (attention_config, attention_quant_kv, kv_cache_store_quant,
                                                      kv_dequantize, takes_dense_prefill)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _kv(B, T, H, D, dtype, device, g):
    x = torch.randn(B, T, H * D, generator=g) * 2 + 0.3
    x[..., :: D // 4] *= 8  # a few large channels per head
    x[x == 0] = 0.25
    return x.to(dtype).to(device)


def _filled_cache(B, H, S, D, device, g):
    """A cache whose every slot holds a quantized random K/V (written by the reference store)."""
    kc = torch.empty(B, H, S, D // 2, dtype=torch.uint8)
    vc = torch.empty_like(kc)
    kp = torch.empty(B, H, S, 2, dtype=torch.float16)
    vp = torch.empty_like(kp)
    k = _kv(B, S, H, D, torch.float32, "cpu", g)
    v = _kv(B, S, H, D, torch.float32, "cpu", g) * 0.5
    ops.kv_cache_store_quant_reference(k, v, kc, kp, vc, vp, torch.zeros(B, dtype=torch.int32), 4, 1.0)
    return [t.to(device) for t in (kc, kp, vc, vp)]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ============================================================================ store
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,T,clip", [(128, 1, 1.0), (64, 5, 1.0), (128, 3, 0.9)])
def test_store_bit_exact(device, dtype, D, T, clip):
    g = _gen(D + T)
    B, H, S = 3, 2, 24
    cache = _filled_cache(B, H, S, D, device, g)
    seqlens = torch.tensor([0, 7, S - T], dtype=torch.int32, device=device)
    k = _kv(B, T, H, D, dtype, device, g)
    v = _kv(B, T, H, D, dtype, device, g) * 0.1
    ours = [t.clone() for t in cache]
    ref = [t.cpu().clone() for t in cache]
    lens = kv_cache_store_quant(k, v, *ours[:2], *ours[2:], seqlens, 4, clip)
    ref_lens = ops.kv_cache_store_quant_reference(k.cpu(), v.cpu(), *ref[:2], *ref[2:], seqlens.cpu(), 4, clip)
    assert lens.dtype == torch.int32 and torch.equal(lens.cpu(), ref_lens)
    for a, b, before in zip(ours, ref, cache):
        assert torch.equal(a.cpu(), b.cpu())
        assert not torch.equal(a.cpu(), before.cpu())  # something was written


def test_store_drops_slots_past_the_cache(device):
    """No host check (graph capture): writes past S_max are dropped, the in-range ones land."""
    g = _gen(3)
    B, H, S, D, T = 2, 2, 16, 64, 4
    cache = _filled_cache(B, H, S, D, device, g)
    k, v = _kv(B, T, H, D, torch.float32, device, g), _kv(B, T, H, D, torch.float32, device, g)
    ours = [t.clone() for t in cache]
    kv_cache_store_quant(k, v, *ours[:2], *ours[2:], torch.tensor([2, S - 2], dtype=torch.int32, device=device))
    ref = [t.cpu().clone() for t in cache]  # sequence 0 fully, sequence 1 its first two tokens
    k, v = k.cpu(), v.cpu()
    ops.kv_cache_store_quant_reference(k[:1], v[:1], *(t[:1] for t in ref[:2]), *(t[:1] for t in ref[2:]),
                                       torch.tensor([2], dtype=torch.int32), 4, 1.0)
    ops.kv_cache_store_quant_reference(k[1:, :2], v[1:, :2], *(t[1:] for t in ref[:2]), *(t[1:] for t in ref[2:]),
                                       torch.tensor([S - 2], dtype=torch.int32), 4, 1.0)
    for a, b in zip(ours, ref):
        assert torch.equal(a.cpu(), b.cpu())


# ============================================================================ attention
CASES = [
    # B, T, Hq, Hkv, D, S, kv_lens (None: S for all)
    pytest.param(3, 1, 8, 2, 128, 80, [80, 33, 1], id="decode-gqa4-ragged"),
    pytest.param(2, 1, 4, 4, 64, 96, [96, 50], id="decode-mha-d64"),
    pytest.param(2, 6, 8, 2, 64, 64, [64, 20], id="chunk-gqa-cache"),
    pytest.param(2, 20, 4, 1, 64, 48, [48, 31], id="prefill-gqa4-two-tiles"),
    pytest.param(1, 33, 2, 2, 128, 40, [33], id="prefill-empty-cache"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,Hq,Hkv,D,S,lens", CASES)
def test_attention_matches_reference(device, dtype, B, T, Hq, Hkv, D, S, lens):
    g = _gen(B * 100 + T * 10 + D)
    kc, kp, vc, vp = _filled_cache(B, Hkv, S, D, device, g)
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = (torch.randn(B, T, Hq * D, generator=g) * 2).to(dtype).to(device)
    ref = ops.attention_quant_kv_reference(*(t.cpu() for t in (q, kc, kp, vc, vp, kv_lens)), 4)
    out = attention_quant_kv(q, kc, kp, vc, vp, kv_lens, 4).cpu()
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < TOL[dtype]


def test_head_dim_64_decode_with_many_programs_uses_two_warps(device):
    """The launch rule for head_dim 64 GQA decode over >= 128 (sequence, KV head) pairs (two warps per program),
    and that configuration against the reference op, on ragged lengths."""
    g = _gen(11)
    B, Hq, Hkv, D, S = 43, 9, 3, 64, 24
    kc, kp, vc, vp = _filled_cache(B, Hkv, S, D, device, g)
    kv_lens = torch.randint(1, S + 1, (B,), generator=g, dtype=torch.int32).to(device)
    q = (torch.randn(B, 1, Hq * D, generator=g) * 2).to(torch.bfloat16).to(device)
    assert attention_config(q, kc)["num_warps"] == 2
    assert attention_config(q[:20], kc[:20])["num_warps"] == 4  # 60 programs: four warps
    out = attention_quant_kv(q, kc, kp, vc, vp, kv_lens, 4).cpu()
    ref = ops.attention_quant_kv_reference(*(t.cpu() for t in (q, kc, kp, vc, vp, kv_lens)), 4)
    assert torch.isfinite(out).all() and _rel(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("num_splits,max_seqlen", [(3, None), (None, 40), (2, 32), (1, 8)])
def test_attention_split_kv(device, num_splits, max_seqlen):
    """Split-KV decode with forced splits, and with a max_seqlen hint, right or too small (last split runs on)."""
    g = _gen(7)
    B, Hq, Hkv, D, S = 3, 8, 2, 64, 96
    kc, kp, vc, vp = _filled_cache(B, Hkv, S, D, device, g)
    kv_lens = torch.tensor([40, 9, 38], dtype=torch.int32, device=device)
    q = (torch.randn(B, 1, Hq * D, generator=g) * 3).to(device)
    cfg = attention_config(q, kc, max_seqlen=max_seqlen, num_splits=num_splits, block_n=16)
    assert num_splits is None or cfg["num_splits"] == num_splits
    out = attention_quant_kv(q, kc, kp, vc, vp, kv_lens, 4, max_seqlen=max_seqlen, num_splits=num_splits, block_n=16)
    ref = ops.attention_quant_kv_reference(*(t.cpu() for t in (q, kc, kp, vc, vp, kv_lens)), 4)
    assert _rel(out.cpu(), ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row_kernel,kw", [(True, {}), (True, dict(num_splits=3)), (False, {}),
                                           (True, dict(block_n=64, num_warps=2, acc_rows=64)),
                                           (True, dict(block_n=64, num_warps=4, acc_rows=4))])
def test_attention_mha_decode_paths(device, dtype, row_kernel, kw):
    """T = 1 with MHA: the CUDA-core row kernel (the default there) in several configurations (split-KV, per-slot
    accumulators kept whole or folded to fewer rows), and the MMA path it replaces, on ragged lengths
    including a sequence with a single key."""
    g = _gen(5)
    B, H, D, S = 3, 3, 128, 150
    kc, kp, vc, vp = _filled_cache(B, H, S, D, device, g)
    kv_lens = torch.tensor([150, 1, 77], dtype=torch.int32, device=device)
    q = (torch.randn(B, 1, H * D, generator=g) * 2).to(dtype).to(device)
    cfg = attention_config(q, kc, row_kernel=row_kernel, **kw)
    assert cfg["row_kernel"] == row_kernel and all(cfg[k] == v for k, v in kw.items())
    out = attention_quant_kv(q, kc, kp, vc, vp, kv_lens, 4, row_kernel=row_kernel, **kw).cpu()
    ref = ops.attention_quant_kv_reference(*(t.cpu() for t in (q, kc, kp, vc, vp, kv_lens)), 4)
    assert torch.isfinite(out).all() and out.dtype == dtype
    assert _rel(out, ref) < TOL[dtype]


def test_row_kernel_needs_one_row(device):
    q = torch.randn(1, 1, 4 * 64, device=device)
    kc = torch.zeros(1, 2, 8, 32, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match="one query row"):
        attention_config(q, kc, row_kernel=True)
    with pytest.raises(ValueError, match="acc_rows"):
        attention_config(q[..., :128], kc, row_kernel=True, block_n=32, acc_rows=12)


def test_store_then_decode_round_trip(device):
    """Prefill a chunk into an empty cache, decode one token, both through the kernels, against the references."""
    g = _gen(11)
    B, Hq, Hkv, D, S, T0 = 2, 4, 2, 64, 32, 12
    ours = [torch.zeros(B, Hkv, S, D // 2, dtype=torch.uint8, device=device),
            torch.zeros(B, Hkv, S, 2, dtype=torch.float16, device=device)] * 2
    ours = [t.clone() for t in ours]
    ref = [t.cpu().clone() for t in ours]
    lens = torch.tensor([0, 5], dtype=torch.int32, device=device)
    ref_lens = lens.cpu().clone()
    for T in (T0, 1):
        k, v = _kv(B, T, Hkv, D, torch.float32, device, g), _kv(B, T, Hkv, D, torch.float32, device, g)
        q = torch.randn(B, T, Hq * D, generator=g).to(device)
        lens = kv_cache_store_quant(k, v, *ours[:2], *ours[2:], lens, 4, 1.0)
        ref_lens = ops.kv_cache_store_quant_reference(k.cpu(), v.cpu(), *ref[:2], *ref[2:], ref_lens, 4, 1.0)
        out = attention_quant_kv(q, *ours[:2], *ours[2:], lens, 4)
        expect = ops.attention_quant_kv_reference(q.cpu(), *ref[:2], *ref[2:], ref_lens, 4)
        assert _rel(out.cpu(), expect) < 1e-5
        assert all(torch.equal(a.cpu(), b) for a, b in zip(ours, ref))
    assert torch.equal(lens.cpu(), torch.tensor([T0 + 1, T0 + 6], dtype=torch.int32))


def test_attention_unsupported_raise(device):
    q = torch.randn(1, 1, 96 * 2, device=device)
    kc = torch.zeros(1, 2, 8, 48, dtype=torch.uint8, device=device)
    kp = torch.zeros(1, 2, 8, 2, dtype=torch.float16, device=device)
    with pytest.raises(NotImplementedError):  # head_dim 96
        attention_quant_kv(q, kc, kp, kc, kp, torch.ones(1, dtype=torch.int32, device=device), 4)
    with pytest.raises(NotImplementedError):  # 2-bit
        attention_quant_kv(q, kc, kp, kc, kp, torch.ones(1, dtype=torch.int32, device=device), 2)


# ============================================================================ prefill from an empty cache
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D,n", [(128, 70), (64, 33)])
def test_kv_dequantize_bit_exact(device, dtype, D, n):
    g = _gen(D + n)
    B, H, S = 2, 3, 80
    kc, kp, _, _ = _filled_cache(B, H, S, D, device, g)
    out = kv_dequantize(kc, kp, n, dtype)
    ref = ops.kv_cache_dequantize(kc.cpu(), kp.cpu(), 4, n).to(dtype)
    assert out.shape == (B, H, n, D) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out.cpu(), ref)
    assert ref.abs().max() > 1  # not a cache of zeros
    with pytest.raises(NotImplementedError):
        kv_dequantize(kc, kp, S + 1, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,P,Hq,Hkv,D,S", [(2, 40, 0, 4, 2, 64, 48), (1, 33, 0, 2, 2, 128, 33),
                                               (2, 20, 13, 4, 2, 64, 40), (1, 17, 30, 2, 2, 128, 47),
                                               (2, 24, 0, 9, 3, 64, 24), (1, 18, 11, 9, 3, 64, 32)])  # SmolLM2's heads
def test_dense_prefill_path(device, monkeypatch, dtype, B, T, P, Hq, Hkv, D, S):
    """A prefill after P cached tokens in every sequence (P = 0: a prompt): K/V dequantized once, then one causal
    SDPA (P = 0) or the prefix and the new keys attended apart and merged by log-sum-exp (P > 0); against the
    reference op and the tensor-core kernel on the same cache. Only taken when the caller gives the length."""
    monkeypatch.setattr(kv_attention, "DENSE_PREFILL_MIN_T", 16)
    g = _gen(B * T + D + P)
    cache = _filled_cache(B, Hkv, S, D, device, g)  # every slot written; the first P are the prefix
    k, v = _kv(B, T, Hkv, D, dtype, device, g), _kv(B, T, Hkv, D, dtype, device, g)
    kv_lens = kv_cache_store_quant(k, v, *cache, torch.full((B,), P, dtype=torch.int32, device=device), 4, 1.0)
    q = (torch.randn(B, T, Hq * D, generator=g) * 2).to(dtype).to(device)
    assert takes_dense_prefill(q, cache[0], P)
    assert not takes_dense_prefill(q, cache[0], None)  # the caller does not know the lengths
    assert not takes_dense_prefill(q.float(), cache[0], P)  # fp32 stays on the Triton kernel
    assert not takes_dense_prefill(q[:, :15], cache[0], P)  # below DENSE_PREFILL_MIN_T
    dense = attention_quant_kv(q, *cache, kv_lens, 4, prefix_len=P).cpu()
    tiles = attention_quant_kv(q, *cache, kv_lens, 4).cpu()
    ref = ops.attention_quant_kv_reference(*(t.cpu() for t in (q, *cache, kv_lens)), 4)
    assert dense.shape == ref.shape and dense.dtype == dtype and torch.isfinite(dense).all()
    assert _rel(dense, ref) < TOL[dtype] and _rel(dense, tiles) < TOL[dtype]
    if P:  # the prefix matters: attending to the new keys alone gives something else
        alone = ops.attention_quant_kv_reference(q.cpu(), *(t[:, :, P:].cpu() for t in cache),
                                                 torch.full((B,), T, dtype=torch.int32), 4)
        assert _rel(dense, alone) > 10 * TOL[dtype]
    out = torch.empty_like(q)  # out= is honoured on this path too
    attention_quant_kv(q, *cache, kv_lens, 4, prefix_len=P, out=out)
    assert torch.equal(out.cpu(), dense)


def test_kv_dequantize_repeats_heads_for_gqa(device):
    g = _gen(21)
    kc, kp, _, _ = _filled_cache(2, 3, 40, 64, device, g)
    out = kv_dequantize(kc, kp, 37, torch.bfloat16, repeat=4)
    ref = ops.kv_cache_dequantize(kc.cpu(), kp.cpu(), 4, 37).to(torch.bfloat16).repeat_interleave(4, dim=1)
    assert out.shape == (2, 12, 37, 64) and torch.equal(out.cpu(), ref)


def test_dense_prefill_needs_the_keys_in_the_cache(device, monkeypatch):
    """More keys than cache slots (the store dropped the overflow): not the dense path."""
    monkeypatch.setattr(kv_attention, "DENSE_PREFILL_MIN_T", 4)
    q = torch.randn(1, 9, 2 * 64, dtype=torch.bfloat16, device=device)
    assert not takes_dense_prefill(q, torch.zeros(1, 2, 8, 32, dtype=torch.uint8, device=device), 0)
    assert takes_dense_prefill(q, torch.zeros(1, 2, 9, 32, dtype=torch.uint8, device=device), 0)
    assert not takes_dense_prefill(q, torch.zeros(1, 2, 12, 32, dtype=torch.uint8, device=device), 4)


def test_cache_layout_the_kernels_cannot_read_raises(device):
    """(scale, zero) pairs are read as one int32 per token: params at an odd fp16 offset, or codes of another
    dtype, are refused by the attention and by kv_dequantize alike."""
    kc = torch.zeros(1, 2, 8, 32, dtype=torch.uint8, device=device)
    kp_odd = torch.zeros(1 * 2 * 8 * 2 + 1, dtype=torch.float16, device=device)[1:].view(1, 2, 8, 2)
    q = torch.randn(1, 1, 2 * 64, device=device)
    lens = torch.ones(1, dtype=torch.int32, device=device)
    with pytest.raises(NotImplementedError, match="cache layout"):
        attention_quant_kv(q, kc, kp_odd, kc, kp_odd, lens, 4)
    with pytest.raises(NotImplementedError, match="cache layout"):
        kv_dequantize(kc, kp_odd, 4, torch.bfloat16)
    with pytest.raises(NotImplementedError, match="cache layout"):
        kv_dequantize(kc.to(torch.int8), torch.zeros(1, 2, 8, 2, dtype=torch.float16, device=device), 4, torch.bfloat16)
