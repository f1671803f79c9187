"""Triton kernels for Atom's 4-bit KV cache: the quantizing store and attention over the quantized cache.

``kv_cache_store_quant`` and ``attention_quant_kv`` take the arguments of their reference ops in
``atom_compile/ops.py`` (plus keyword-only tuning arguments) and use the cache layout of
``atom_compile/kv_cache.py``:

- codes  ``uint8 [B, H_kv, S_max, D/2]``: asymmetric 4-bit codes, byte j holds element j (bits 0-3)
  and element j + D/2 (bits 4-7) (``quant.kv_pack``);
- params ``float16 [B, H_kv, S_max, 2]``: (scale, zero) of each (token, head); the value is
  (code - zero) * scale.

Neither function synchronizes with the host, so both can be captured in a CUDA graph:
``kv_cache_store_quant`` drops writes past S_max instead of raising (the reference raises; it must
read the lengths to do so), and ``attention_quant_kv`` bounds its work by ``max_seqlen`` (a host int
the caller knows, e.g. the cache length) instead of reading ``kv_lens``.

Attention maths. With K = (c - z) * s per token (c the 4-bit codes, z and s the token's zero and
scale), a score is s * (q . c - z * sum(q)): the codes go into the tensor-core dot unscaled (0..15 are
exact in bf16 / fp16) and the affine correction is applied per token, after the dot. The value side
is the same: sum_n p_n (c_n - z_n) s_n = (p * s) @ c - sum_n p_n s_n z_n. The half-split packing
gives the low nibbles of a row = dims [0, D/2) and the high nibbles = dims [D/2, D), so each product
is two dots of depth D/2 with no interleaving. The softmax is online (flash attention) in fp32 and
the exponentials are exp2 with log2(e) folded into the scale.

Two attention kernels: the CUDA-core row kernel for one query row per KV head (MHA decode: scores and
values in fp32 FMAs, whatever the query dtype) and the tensor-core kernel for everything else; plus, for a
prefill into caches whose lengths the caller knows to be equal (empty for a prompt), the keys and values
dequantized once by ``kv_dequantize`` and attended by cuDNN's flash kernel (through torch).
Precision of the tensor-core dots: fp32 queries use fp32 FMA dots (``input_precision="ieee"``); bf16 / fp16
queries use their own dtype for Q.K (queries and codes exact, fp32 accumulation) and fp16 for P.V
with P * s normalized by the tile's largest s (so that P in [0, 1] keeps fp16's 11 bits).

Paging: every cache access is ``base(b, h) + slot * stride_slot``; a paged cache would replace the
slot computation by ``block_table[b, slot // page] * page_stride + slot % page`` in the two load
sites of ``_attn_fwd_kernel`` and the store site of ``_kv_store_kernel``, with BLOCK_N dividing the
page size so that a tile never straddles pages. See docs/notes_quant_attention.md.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .device_info import num_sms

# One query row per KV head (MHA decode) goes to the CUDA-core row kernel unless a caller asks otherwise;
# False sends it to the tensor-core kernel (A/B timing: bench/bench_layer.py --variants).
ROW_KERNEL = True
ROW_PROGRAMS_PER_SM = 8  # split-KV target for the row kernel (H100: B*H = 2048 runs best unsplit)
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
_EXACT = {"enable_fp_fusion": False, "enable_reflect_ftz": False}
LOG2E = 1.4426950408889634


def interp_mode() -> bool:
    return _interpreting()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _rint(v):
    """Round half to even (exact for |v| < 2^22; larger magnitudes keep their sign, then get clamped)."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _round_bf16(x):
    """fp32 -> nearest-even bf16 value, as fp32 (the CPU interpreter's own cast truncates)."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


# ============================================================================ quantizing store
@triton.jit
def _kv_quant_store_rows(x_ptr, c_ptr, p_ptr, seqlens_ptr, rows, n_rows, T, H, S,
                         stride_xb, stride_xt, stride_cb, stride_ch, stride_cs, stride_pb, stride_ph, stride_ps,
                         clip, D: tl.constexpr):
    HALF: tl.constexpr = D // 2
    rmask = rows < n_rows
    h = rows % H
    bt = rows // H
    t = bt % T
    b = bt // T
    slot = tl.load(seqlens_ptr + b, mask=rmask, other=0).to(tl.int64) + t
    ok = rmask & (slot >= 0) & (slot < S)
    d = tl.arange(0, HALF)[None, :]
    m2 = ok[:, None] & (d >= 0)
    xbase = x_ptr + b.to(tl.int64) * stride_xb + t.to(tl.int64) * stride_xt + h * D
    x_lo = tl.load(xbase[:, None] + d, mask=m2, other=0.0).to(tl.float32)
    x_hi = tl.load(xbase[:, None] + HALF + d, mask=m2, other=0.0).to(tl.float32)
    xmax = tl.maximum(tl.max(x_lo, axis=1), tl.max(x_hi, axis=1)) * clip
    xmin = tl.minimum(tl.min(x_lo, axis=1), tl.min(x_hi, axis=1)) * clip
    scale = tl.math.div_rn(xmax - xmin, 15.0).to(tl.float16).to(tl.float32)  # rounded before use, as stored
    scale = tl.where(scale > 0, scale, 1.0)
    zero = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-xmin, scale)), 0.0), 15.0)
    s2 = scale[:, None]
    z2 = zero[:, None]
    c_lo = tl.minimum(tl.maximum(_rint(tl.math.div_rn(x_lo, s2)) + z2, 0.0), 15.0).to(tl.int32)
    c_hi = tl.minimum(tl.maximum(_rint(tl.math.div_rn(x_hi, s2)) + z2, 0.0), 15.0).to(tl.int32)
    byte = (c_lo | (c_hi << 4)).to(tl.uint8)
    cbase = c_ptr + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch + slot * stride_cs
    tl.store(cbase[:, None] + d, byte, mask=m2)
    pbase = p_ptr + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph + slot * stride_ps
    tl.store(pbase, scale.to(tl.float16), mask=ok)
    tl.store(pbase + 1, zero.to(tl.float16), mask=ok)


@triton.jit
def _kv_store_kernel(k_ptr, v_ptr, kc_ptr, kp_ptr, vc_ptr, vp_ptr, seqlens_ptr, n_rows, T, H, S,
                     stride_kb, stride_kt, stride_vb, stride_vt,
                     stride_kcb, stride_kch, stride_kcs, stride_kpb, stride_kph, stride_kps,
                     stride_vcb, stride_vch, stride_vcs, stride_vpb, stride_vph, stride_vps,
                     clip, D: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rows are (b, t, head) of the new tokens; program axis 1 picks K (0) or V (1).
    Grid: (cdiv(B * T * H_kv, BLOCK_R), 2)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if tl.program_id(1) == 0:
        _kv_quant_store_rows(k_ptr, kc_ptr, kp_ptr, seqlens_ptr, rows, n_rows, T, H, S, stride_kb, stride_kt,
                             stride_kcb, stride_kch, stride_kcs, stride_kpb, stride_kph, stride_kps, clip, D)
    else:
        _kv_quant_store_rows(v_ptr, vc_ptr, vp_ptr, seqlens_ptr, rows, n_rows, T, H, S, stride_vb, stride_vt,
                             stride_vcb, stride_vch, stride_vcs, stride_vpb, stride_vph, stride_vps, clip, D)


def kv_cache_store_quant(k: Tensor, v: Tensor, k_cache: Tensor, k_params: Tensor, v_cache: Tensor, v_params: Tensor,
                         cache_seqlens: Tensor, bits: int = 4, clip: float = 1.0, *, block_rows: int | None = None
                         ) -> Tensor:
    """Quantize k, v [B, T, H_kv * D] per (token, head) to 4 bits and write codes and (scale, zero) in place at
    slots cache_seqlens[b] + t; returns cache_seqlens + T (int32). Same contract as
    ``ops.kv_cache_store_quant_reference``, bit-exact, except that slots >= S_max are dropped (no host check)."""
    if bits != 4:
        raise NotImplementedError(f"triton kv_cache_store_quant: bits={bits} (4 only)")
    B, T, HD = k.shape
    Bc, H, S, Dh = k_cache.shape
    D = 2 * Dh
    if D not in (64, 128) or HD != H * D or v.shape != k.shape or Bc != B:
        raise NotImplementedError(f"triton kv_cache_store_quant: k {tuple(k.shape)}, cache {tuple(k_cache.shape)}")
    if k.dtype not in _TL_DTYPES or v.dtype not in _TL_DTYPES:
        raise NotImplementedError(f"triton kv_cache_store_quant: dtype {k.dtype}")
    for c, p in ((k_cache, k_params), (v_cache, v_params)):
        if c.dtype != torch.uint8 or p.dtype != torch.float16 or c.stride(-1) != 1 or p.stride(-1) != 1 \
                or p.shape != (B, H, S, 2) or c.shape != (B, H, S, Dh):
            raise NotImplementedError("triton kv_cache_store_quant: cache layout")
    if not k.is_cuda and not _interpreting():
        raise NotImplementedError("triton kv_cache_store_quant: needs CUDA tensors (or TRITON_INTERPRET=1)")
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    n_rows = B * T * H
    if n_rows:
        BLOCK_R = block_rows or (16 if D == 128 else 32)
        _kv_store_kernel[(triton.cdiv(n_rows, BLOCK_R), 2)](
            k, v, k_cache, k_params, v_cache, v_params, cache_seqlens, n_rows, T, H, S,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            *k_cache.stride()[:3], *k_params.stride()[:3], *v_cache.stride()[:3], *v_params.stride()[:3],
            float(clip), D=D, BLOCK_R=BLOCK_R, num_warps=4, **_EXACT,
        )
    return (cache_seqlens + T).to(torch.int32)


# ============================================================================ attention
_NIBBLE_ASM = """
{{
.reg .b32 t01, t23, m, z;
mov.b32 m, 0x64006400;
mov.b32 z, 0;
prmt.b32 t01, $2, z, 0x4140;
prmt.b32 t23, $2, z, 0x4342;
{shift}
lop3.b32 $0, t01, 0x000F000F, m, 0xEA;
lop3.b32 $1, t23, 0x000F000F, m, 0xEA;
sub.f16x2 $0, $0, m;
sub.f16x2 $1, $1, m;
}}
"""
_ASM_LO = tl.constexpr(_NIBBLE_ASM.format(shift=""))
_ASM_HI = tl.constexpr(_NIBBLE_ASM.format(shift="shr.u32 t01, t01, 4;\nshr.u32 t23, t23, 4;"))


@triton.jit
def _nibble_lo_f16(c):
    """uint8 codes -> their low nibbles as fp16 values 0..15, four bytes per asm block.

    fp16 bits 0x6400 | n are 1024 + n exactly: the bytes are spread over half-words (prmt), masked and or-ed
    with 0x6400 (lop3), then 1024 is subtracted (sub.f16x2). About 1.5 integer instructions per element
    instead of a quarter-rate int-to-float conversion; and a pure unary elementwise op, so Triton may move
    the conversion to the dot-operand layout in front of it (onto the 1-byte codes).
    """
    return tl.inline_asm_elementwise(_ASM_LO, "=r,=r,r", [c], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _nibble_hi_f16(c):
    """uint8 codes -> their high nibbles as fp16 values 0..15 (see _nibble_lo_f16)."""
    return tl.inline_asm_elementwise(_ASM_HI, "=r,=r,r", [c], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _unpack_params(p32):
    """int32 view of an fp16 (scale, zero) pair -> (scale, zero) in fp32 (little endian: scale is the low half)."""
    scale = (p32 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    zero = (p32 >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return scale, zero


@triton.jit
def _split_range_and_bases(pid_s, chunk, n_splits, n_hi, b, kvh, kc_ptr, vc_ptr, kp_ptr, vp_ptr, stride_kcb, stride_kch,
                           stride_vcb, stride_vch, stride_kpb, stride_kph, stride_vpb, stride_vph):
    """This split's key range [n_lo, n_end) (keys below n_hi) and the cache bases of (sequence b, KV head kvh)."""
    n_lo = pid_s * chunk
    n_end = tl.minimum(n_lo + chunk, n_hi)
    if pid_s == n_splits - 1:  # the last split runs to the end: max_seqlen is only a hint
        n_end = n_hi
    kc_base = kc_ptr + b.to(tl.int64) * stride_kcb + kvh.to(tl.int64) * stride_kch
    vc_base = vc_ptr + b.to(tl.int64) * stride_vcb + kvh.to(tl.int64) * stride_vch
    kp_base = kp_ptr + b.to(tl.int64) * stride_kpb + kvh.to(tl.int64) * stride_kph
    vp_base = vp_ptr + b.to(tl.int64) * stride_vpb + kvh.to(tl.int64) * stride_vph
    return n_lo, n_end, kc_base, vc_base, kp_base, vp_base


@triton.jit
def _attn_block(start, n_end, qpos, q_lo, q_hi, qsum, qk_scale, m_i, l_i, z_i, acc_lo, acc_hi,
                kc_base, kp_base, vc_base, vp_base, stride_kcs, stride_kps, stride_vcs, stride_vps,
                HALF: tl.constexpr, BLOCK_N: tl.constexpr, QK_DTYPE: tl.constexpr, PV_DTYPE: tl.constexpr,
                IEEE: tl.constexpr, FAST_UNPACK: tl.constexpr, CAUSAL: tl.constexpr):
    """One tile of BLOCK_N keys [start, start + BLOCK_N) (masked at n_end): scores, online softmax, P.V."""
    dd = tl.arange(0, HALF)
    n = start + tl.arange(0, BLOCK_N)
    n_ok = n < n_end
    slot = n  # int32 offsets from the (b, h) base; paging: block_table[b, slot // PAGE] * page_stride + slot % PAGE
    # ---- scores: s * (q . c - z * sum(q)), in log2 units
    kt = tl.load(kc_base + slot[None, :] * stride_kcs + dd[:, None], mask=n_ok[None, :], other=0)  # [HALF, BLOCK_N]
    k_scale, k_zero = _unpack_params(tl.load(kp_base + slot * stride_kps, mask=n_ok, other=0))
    if FAST_UNPACK:
        k_lo = _nibble_lo_f16(kt)
        k_hi = _nibble_hi_f16(kt)
    else:
        k_lo = (kt & 15).to(QK_DTYPE)
        k_hi = (kt >> 4).to(QK_DTYPE)
    if IEEE:
        r = tl.dot(q_lo, k_lo, input_precision="ieee")
        r += tl.dot(q_hi, k_hi, input_precision="ieee")
    else:
        r = tl.dot(q_lo, k_lo)
        r += tl.dot(q_hi, k_hi)
    s = (r - qsum[:, None] * k_zero[None, :]) * (k_scale * qk_scale)[None, :]
    if CAUSAL:
        s = tl.where((n[None, :] <= qpos[:, None]) & n_ok[None, :], s, float("-inf"))
    else:  # one query per sequence (decode): every loaded key is visible
        s = tl.where(n_ok[None, :], s, float("-inf"))
    # ---- online softmax (a row with nothing visible yet keeps m = -inf without NaNs)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # ---- values: (p * s) @ c - sum(p * s * z)
    vc = tl.load(vc_base + slot[:, None] * stride_vcs + dd[None, :], mask=n_ok[:, None], other=0)
    v_scale, v_zero = _unpack_params(tl.load(vp_base + slot * stride_vps, mask=n_ok, other=0))  # 0 when masked
    if IEEE:
        ps = p * v_scale[None, :]
        pv_lo = tl.dot(ps, (vc & 15).to(tl.float32), input_precision="ieee")
        pv_hi = tl.dot(ps, (vc >> 4).to(tl.float32), input_precision="ieee")
        z_i = z_i * alpha + tl.sum(ps * v_zero[None, :], axis=1)
    else:
        s_max = tl.maximum(tl.max(v_scale, axis=0), 1e-30)
        pn = (p * (v_scale * (1.0 / s_max))[None, :]).to(PV_DTYPE)
        if FAST_UNPACK:
            v_lo = _nibble_lo_f16(vc)
            v_hi = _nibble_hi_f16(vc)
        else:
            v_lo = (vc & 15).to(PV_DTYPE)
            v_hi = (vc >> 4).to(PV_DTYPE)
        pv_lo = tl.dot(pn, v_lo) * s_max
        pv_hi = tl.dot(pn, v_hi) * s_max
        z_i = z_i * alpha + tl.sum(pn.to(tl.float32) * v_zero[None, :], axis=1) * s_max
    acc_lo = acc_lo * alpha[:, None] + pv_lo
    acc_hi = acc_hi * alpha[:, None] + pv_hi
    return m_new, l_i, z_i, acc_lo, acc_hi


@triton.jit
def _attn_fwd_kernel(

    q_ptr, kc_ptr, kp_ptr, vc_ptr, vp_ptr, lens_ptr, o_ptr, po_ptr, pml_ptr,
    B, T, H_KV, n_m_tiles, chunk, n_splits, qk_scale,
    stride_qb, stride_qt, stride_ob, stride_ot,
    stride_kcb, stride_kch, stride_kcs, stride_kpb, stride_kph, stride_kps,
    stride_vcb, stride_vch, stride_vcs, stride_vpb, stride_vph, stride_vps,
    GROUP: tl.constexpr,  # query heads per KV head
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,  # write unnormalized partials (split-KV) instead of the output
    QK_DTYPE: tl.constexpr, PV_DTYPE: tl.constexpr, IEEE: tl.constexpr, OUT_BF16: tl.constexpr,
    INTERP_LOOP: tl.constexpr, MAX_TILES: tl.constexpr, FAST_UNPACK: tl.constexpr, CAUSAL: tl.constexpr,
):
    """One program: BLOCK_M rows of (token, query head of one KV group) x one KV range of one sequence.

    Rows r = t * GROUP + h, so the GROUP query heads that share a KV head share its K/V tiles (GQA reuse).
    Grid: (m tiles, B * H_kv, splits). Keys are visited from the split's start in BLOCK_N steps up to
    min(split end, last position any row of the tile may see).
    """
    HALF: tl.constexpr = D // 2
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H_KV
    kvh = pid_bh % H_KV
    m_tile = n_m_tiles - 1 - pid_m  # the longest causal tiles start first
    kv_len = tl.load(lens_ptr + b).to(tl.int32)
    n_rows = T * GROUP
    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    t = rows // GROUP
    hq = kvh * GROUP + rows % GROUP
    qpos = kv_len - T + t  # position of each query row
    dd = tl.arange(0, HALF)
    q_off = b.to(tl.int64) * stride_qb + t.to(tl.int64) * stride_qt + hq * D
    qmask = row_ok[:, None] & (dd[None, :] >= 0)
    q_lo = tl.load(q_ptr + q_off[:, None] + dd[None, :], mask=qmask, other=0.0)
    q_hi = tl.load(q_ptr + q_off[:, None] + HALF + dd[None, :], mask=qmask, other=0.0)
    qsum = tl.sum(q_lo.to(tl.float32), axis=1) + tl.sum(q_hi.to(tl.float32), axis=1)
    q_lo = q_lo.to(QK_DTYPE)
    q_hi = q_hi.to(QK_DTYPE)

    t_last = (tl.minimum((m_tile + 1) * BLOCK_M, n_rows) - 1) // GROUP
    n_hi = tl.minimum(kv_len - T + t_last + 1, kv_len)  # keys any row of this tile can see
    n_lo, n_end, kc_base, vc_base, kp_base, vp_base = _split_range_and_bases(
        pid_s, chunk, n_splits, n_hi, b, kvh, kc_ptr, vc_ptr, kp_ptr, vp_ptr, stride_kcb, stride_kch, stride_vcb,
        stride_vch, stride_kpb, stride_kph, stride_vpb, stride_vph)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    z_i = tl.zeros([BLOCK_M], tl.float32)  # sum_n p_n * s_n * z_n of the values
    acc_lo = tl.zeros([BLOCK_M, HALF], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, HALF], tl.float32)
    if INTERP_LOOP:
        # the CPU interpreter (numpy 2) cannot take a loaded value as a range() bound: it visits a host-given
        # number of tiles, the ones past n_end fully masked (same block code, more work)
        for it in range(0, MAX_TILES):
            m_i, l_i, z_i, acc_lo, acc_hi = _attn_block(
                n_lo + it * BLOCK_N, n_end, qpos, q_lo, q_hi, qsum, qk_scale, m_i, l_i, z_i, acc_lo, acc_hi,
                kc_base, kp_base, vc_base, vp_base, stride_kcs, stride_kps, stride_vcs, stride_vps,
                HALF, BLOCK_N, QK_DTYPE, PV_DTYPE, IEEE, FAST_UNPACK, CAUSAL)
    else:
        for start in range(n_lo, n_end, BLOCK_N):
            m_i, l_i, z_i, acc_lo, acc_hi = _attn_block(
                start, n_end, qpos, q_lo, q_hi, qsum, qk_scale, m_i, l_i, z_i, acc_lo, acc_hi,
                kc_base, kp_base, vc_base, vp_base, stride_kcs, stride_kps, stride_vcs, stride_vps,
                HALF, BLOCK_N, QK_DTYPE, PV_DTYPE, IEEE, FAST_UNPACK, CAUSAL)

    acc_lo = acc_lo - z_i[:, None]
    acc_hi = acc_hi - z_i[:, None]
    if SPLIT:
        # partials [splits, B, T, Hq, D] (fp32, unnormalized) and [splits, B, T, Hq, 2] (m in log2 units, l)
        prow = ((pid_s * B + b).to(tl.int64) * T + t) * (H_KV * GROUP) + hq
        tl.store(po_ptr + prow[:, None] * D + dd[None, :], acc_lo, mask=qmask)
        tl.store(po_ptr + prow[:, None] * D + HALF + dd[None, :], acc_hi, mask=qmask)
        tl.store(pml_ptr + prow * 2, m_i, mask=row_ok)
        tl.store(pml_ptr + prow * 2 + 1, l_i, mask=row_ok)
    else:
        inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)[:, None]  # a row that sees no key: 0
        out_lo = acc_lo * inv_l
        out_hi = acc_hi * inv_l
        if OUT_BF16:
            out_lo = _round_bf16(out_lo)
            out_hi = _round_bf16(out_hi)
        o_off = b.to(tl.int64) * stride_ob + t.to(tl.int64) * stride_ot + hq * D
        tl.store(o_ptr + o_off[:, None] + dd[None, :], out_lo.to(o_ptr.dtype.element_ty), mask=qmask)
        tl.store(o_ptr + o_off[:, None] + HALF + dd[None, :], out_hi.to(o_ptr.dtype.element_ty), mask=qmask)


# Nibble unpacking for the row kernel (UNPACK): 0 int-to-float casts (the CPU interpreter); 1 exact on the GPU
# (2^23 + c, minus 2^23); 2 offset on the GPU (128 + c: the callers take 128 out once per key; 16-bit queries).
UNPACK_CAST, UNPACK_EXACT, UNPACK_OFFSET = 0, 1, 2
_F32_NIBBLE_ASM = """
{{
.reg .b32 t, m;
mov.b32 m, {magic};
{shift}and.b32 t, t, 0x0F0F0F0F;
prmt.b32 $0, t, m, {s0};
prmt.b32 $1, t, m, {s1};
prmt.b32 $2, t, m, {s2};
prmt.b32 $3, t, m, {s3};
{sub}}}
"""
_SHIFT_LO, _SHIFT_HI = "mov.b32 t, $4;\n", "shr.u32 t, $4, 4;\n"
# exact: byte i in bits 0-7 under the exponent of 2^23 (0x4B0000cc = 2^23 + c), then 2^23 subtracted
_EXACT_ASM = dict(magic="0x4B000000", s0="0x7440", s1="0x7441", s2="0x7442", s3="0x7443",
                  sub="".join(f"sub.f32 ${i}, ${i}, 0f4B000000;\n" for i in range(4)))
# offset: byte i in bits 16-23 under the exponent of 2^7 (bit 23 stays 0: 0x430c0000 = 128 + c), nothing subtracted
_OFFSET_ASM = dict(magic="0x43000000", s0="0x7044", s1="0x7144", s2="0x7244", s3="0x7344", sub="")
_ASM_EXACT_LO = tl.constexpr(_F32_NIBBLE_ASM.format(shift=_SHIFT_LO, **_EXACT_ASM))
_ASM_EXACT_HI = tl.constexpr(_F32_NIBBLE_ASM.format(shift=_SHIFT_HI, **_EXACT_ASM))
_ASM_OFFSET_LO = tl.constexpr(_F32_NIBBLE_ASM.format(shift=_SHIFT_LO, **_OFFSET_ASM))
_ASM_OFFSET_HI = tl.constexpr(_F32_NIBBLE_ASM.format(shift=_SHIFT_HI, **_OFFSET_ASM))


@triton.jit
def _asm_nibbles_f32(c, ASM: tl.constexpr):
    """One of the _ASM_* blocks above over uint8 codes, four bytes per block, four fp32 out."""
    return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [c], dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _nibbles_f32(c, HI: tl.constexpr, UNPACK: tl.constexpr):
    """uint8 codes -> their low (or high) nibbles n as fp32, plus ``_nibble_offset(UNPACK)``.

    On the GPU, four bytes at a time: mask the nibbles (and.b32), then place each byte under the exponent bits
    of a power of two with one prmt. UNPACK_EXACT: fp32 bits 0x4B0000cc = 2^23 + c, minus 2^23 (2 instructions
    per element). UNPACK_OFFSET: bits 0x430c0000 = 128 + c (1.25-1.5 instructions per element: the 128 is linear,
    so the callers subtract it once per key from a sum; that sum is up to ~20x larger than the result, so its
    rounding error is ~20x an exact unpack's: kept for 16-bit queries, whose output rounding is far coarser).
    A quarter-rate int-to-float conversion would be 1 + 3 issue slots.
    """
    if UNPACK == 1:
        return _asm_nibbles_f32(c, _ASM_EXACT_HI if HI else _ASM_EXACT_LO)
    elif UNPACK == 2:
        return _asm_nibbles_f32(c, _ASM_OFFSET_HI if HI else _ASM_OFFSET_LO)
    else:
        if HI:
            return (c >> 4).to(tl.float32)
        else:
            return (c & 15).to(tl.float32)


@triton.jit
def _nibble_offset(UNPACK: tl.constexpr):
    """What _nibbles_f32 adds to each nibble."""
    if UNPACK == 2:
        return 128.0
    else:
        return 0.0


@triton.jit
def _fold_rows(x, ACC_ROWS: tl.constexpr):
    """[BLOCK_N, HALF] -> [ACC_ROWS, HALF]: sums rows r, r + ACC_ROWS, r + 2 ACC_ROWS, ... (with ACC_ROWS = the
    rows one pass of the CTA's threads covers, those rows sit in the same thread: no data movement)."""
    BLOCK_N: tl.constexpr = x.shape[0]
    HALF: tl.constexpr = x.shape[1]
    if ACC_ROWS == BLOCK_N:
        return x
    else:
        return tl.sum(tl.reshape(x, [BLOCK_N // ACC_ROWS, ACC_ROWS, HALF]), axis=0)


@triton.jit
def _add_folded(acc, x):
    """acc + _fold_rows(x, acc.shape[0]); with two rows per slot as acc + x0 + x1, so that products in x become FMAs."""
    ACC_ROWS: tl.constexpr = acc.shape[0]
    BLOCK_N: tl.constexpr = x.shape[0]
    HALF: tl.constexpr = x.shape[1]
    if BLOCK_N == 2 * ACC_ROWS:
        x0, x1 = tl.split(tl.permute(tl.reshape(x, [2, ACC_ROWS, HALF]), (1, 2, 0)))
        return acc + x0 + x1
    else:
        return acc + _fold_rows(x, ACC_ROWS)


@triton.jit
def _decode_row_block(start, n_end, q_lo, q_hi, qsum, qk_scale, m_i, l_i, z_i, acc_lo, acc_hi,
                      kc_base, kp_base, vc_base, vp_base, stride_kcs, stride_kps, stride_vcs, stride_vps,
                      HALF: tl.constexpr, BLOCK_N: tl.constexpr, UNPACK: tl.constexpr, ACC_ROWS: tl.constexpr):
    """One tile of BLOCK_N keys for a single query row, on CUDA cores in fp32 (see _attn_decode_row_kernel).

    acc_lo / acc_hi are [ACC_ROWS, HALF] partial sums of the weighted values (key slot modulo ACC_ROWS), reduced
    over their rows once at the end (a full reduction per tile would cross lanes and warps every tile). They
    are rescaled only when the running max grows (a uniform branch: one row per program), which is exact,
    since alpha is 1 otherwise."""
    dd = tl.arange(0, HALF)
    n = start + tl.arange(0, BLOCK_N)
    n_ok = n < n_end
    slot = n  # paging: block_table[b, slot // PAGE] * page_stride + slot % PAGE
    kt = tl.load(kc_base + slot[:, None] * stride_kcs + dd[None, :], mask=n_ok[:, None], other=0)  # [BLOCK_N, HALF]
    vt = tl.load(vc_base + slot[:, None] * stride_vcs + dd[None, :], mask=n_ok[:, None], other=0)
    k_scale, k_zero = _unpack_params(tl.load(kp_base + slot * stride_kps, mask=n_ok, other=0))
    v_scale, v_zero = _unpack_params(tl.load(vp_base + slot * stride_vps, mask=n_ok, other=0))  # 0 when masked
    # the unpacked nibbles are off + c: q . (off + c) - (z + off) * sum(q) = q . c - z * sum(q)
    off = _nibble_offset(UNPACK)
    # (two sums: their in-thread parts are FMA chains)
    r = tl.sum(_nibbles_f32(kt, False, UNPACK) * q_lo[None, :], axis=1) + \
        tl.sum(_nibbles_f32(kt, True, UNPACK) * q_hi[None, :], axis=1)
    s = (r - qsum * (k_zero + off)) * (k_scale * qk_scale)
    s = tl.where(n_ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    if m_new > m_i:
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha
        z_i = z_i * alpha
        acc_lo = acc_lo * alpha
        acc_hi = acc_hi * alpha
        m_i = m_new
    p = tl.exp2(s - tl.where(m_i == float("-inf"), 0.0, m_i))
    l_i = l_i + tl.sum(p, axis=0)
    ps = p * v_scale
    acc_lo = _add_folded(acc_lo, ps[:, None] * _nibbles_f32(vt, False, UNPACK))
    acc_hi = _add_folded(acc_hi, ps[:, None] * _nibbles_f32(vt, True, UNPACK))
    z_i = z_i + tl.sum(ps * (v_zero + off), axis=0)  # sum p s (off + c) - sum p s (z + off)
    return m_i, l_i, z_i, acc_lo, acc_hi


@triton.jit
def _attn_decode_row_kernel(
    q_ptr, kc_ptr, kp_ptr, vc_ptr, vp_ptr, lens_ptr, o_ptr, po_ptr, pml_ptr,
    B, H_KV, chunk, n_splits, qk_scale,
    stride_qb, stride_ob,
    stride_kcb, stride_kch, stride_kcs, stride_kpb, stride_kph, stride_kps,
    stride_vcb, stride_vch, stride_vcs, stride_vpb, stride_vph, stride_vps,
    D: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, OUT_BF16: tl.constexpr,
    INTERP_LOOP: tl.constexpr, MAX_TILES: tl.constexpr, UNPACK: tl.constexpr, ACC_ROWS: tl.constexpr,
):
    """Decode with one query row per KV head (T = 1, MHA): CUDA cores instead of tensor cores.

    The MMA path pads a KV head's query rows to 16, so with one row it does 16x the softmax work. Here one
    program holds one query row of one (sequence, head) and one KV range; a key tile is [BLOCK_N, D/2] code
    bytes; scores are fp32 products of the unpacked nibbles with the query, reduced over D; the weighted
    values are accumulated per key slot and reduced over the keys after the loop. Grid: (B * H_kv, splits). Same maths and partial layout as _attn_fwd_kernel.
    """
    HALF: tl.constexpr = D // 2
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // H_KV
    h = pid_bh % H_KV
    kv_len = tl.load(lens_ptr + b).to(tl.int32)
    dd = tl.arange(0, HALF)
    q_off = b.to(tl.int64) * stride_qb + h * D
    q_lo = tl.load(q_ptr + q_off + dd).to(tl.float32)
    q_hi = tl.load(q_ptr + q_off + HALF + dd).to(tl.float32)
    qsum = tl.sum(q_lo, axis=0) + tl.sum(q_hi, axis=0)
    n_lo, n_end, kc_base, vc_base, kp_base, vp_base = _split_range_and_bases(
        pid_s, chunk, n_splits, kv_len, b, h, kc_ptr, vc_ptr, kp_ptr, vp_ptr, stride_kcb, stride_kch, stride_vcb,
        stride_vch, stride_kpb, stride_kph, stride_vpb, stride_vph)
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.zeros([], tl.float32)
    z_i = tl.zeros([], tl.float32)
    acc_lo = tl.zeros([ACC_ROWS, HALF], tl.float32)
    acc_hi = tl.zeros([ACC_ROWS, HALF], tl.float32)
    if INTERP_LOOP:  # (see _attn_fwd_kernel: the interpreter visits a host-given number of tiles)
        for it in range(0, MAX_TILES):
            m_i, l_i, z_i, acc_lo, acc_hi = _decode_row_block(
                n_lo + it * BLOCK_N, n_end, q_lo, q_hi, qsum, qk_scale, m_i, l_i, z_i, acc_lo, acc_hi,
                kc_base, kp_base, vc_base, vp_base, stride_kcs, stride_kps, stride_vcs, stride_vps,
                HALF, BLOCK_N, UNPACK, ACC_ROWS)
    else:
        for start in range(n_lo, n_end, BLOCK_N):
            m_i, l_i, z_i, acc_lo, acc_hi = _decode_row_block(
                start, n_end, q_lo, q_hi, qsum, qk_scale, m_i, l_i, z_i, acc_lo, acc_hi,
                kc_base, kp_base, vc_base, vp_base, stride_kcs, stride_kps, stride_vcs, stride_vps,
                HALF, BLOCK_N, UNPACK, ACC_ROWS)
    acc_lo = tl.sum(acc_lo, axis=0) - z_i
    acc_hi = tl.sum(acc_hi, axis=0) - z_i
    if SPLIT:  # partials [splits, B, 1, Hq, D] and [splits, B, 1, Hq, 2], as _attn_fwd_kernel writes them
        prow = (pid_s * B + b).to(tl.int64) * H_KV + h
        tl.store(po_ptr + prow * D + dd, acc_lo)
        tl.store(po_ptr + prow * D + HALF + dd, acc_hi)
        tl.store(pml_ptr + prow * 2, m_i)
        tl.store(pml_ptr + prow * 2 + 1, l_i)
    else:
        inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
        out_lo = acc_lo * inv_l
        out_hi = acc_hi * inv_l
        if OUT_BF16:
            out_lo = _round_bf16(out_lo)
            out_hi = _round_bf16(out_hi)
        o_off = b.to(tl.int64) * stride_ob + h * D
        tl.store(o_ptr + o_off + dd, out_lo.to(o_ptr.dtype.element_ty))
        tl.store(o_ptr + o_off + HALF + dd, out_hi.to(o_ptr.dtype.element_ty))


@triton.jit
def _combine_kernel(po_ptr, pml_ptr, o_ptr, n_rows, T, HQ, n_splits, stride_ob, stride_ot,
                    D: tl.constexpr, SPLITS_PAD: tl.constexpr, ROWS: tl.constexpr, OUT_BF16: tl.constexpr):
    """Merge the split-KV partials of ROWS (b, t, head) rows: out = sum_i w_i o_i / sum_i w_i l_i with
    w_i = 2^(m_i - max m). Grid: (cdiv(B * T * Hq, ROWS),)."""
    for r in range(ROWS):
        row = tl.program_id(0) * ROWS + r
        ok = row < n_rows
        row64 = row.to(tl.int64)
        sp = tl.arange(0, SPLITS_PAD)
        smask = (sp < n_splits) & ok
        idx = sp.to(tl.int64) * n_rows + row64
        m = tl.load(pml_ptr + idx * 2, mask=smask, other=float("-inf"))
        l = tl.load(pml_ptr + idx * 2 + 1, mask=smask, other=0.0)
        m_max = tl.max(m, axis=0)
        m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.exp2(m - m_use)
        denom = tl.sum(w * l, axis=0)
        dd = tl.arange(0, D)
        o = tl.load(po_ptr + idx[:, None] * D + dd[None, :], mask=smask[:, None], other=0.0)
        out = tl.sum(w[:, None] * o, axis=0) * tl.where(denom > 0, 1.0 / tl.where(denom > 0, denom, 1.0), 0.0)
        if OUT_BF16:
            out = _round_bf16(out)
        b = row64 // (T * HQ)
        rem = row64 % (T * HQ)
        t = rem // HQ
        h = rem % HQ
        tl.store(o_ptr + b * stride_ob + t * stride_ot + h * D + dd, out.to(o_ptr.dtype.element_ty),
                 mask=(dd < D) & ok)


# ============================================================================ prefill from an empty cache
def _params_readable_as_int32(codes: Tensor, params: Tensor, params_shape: tuple) -> bool:
    """uint8 codes with unit last stride, and fp16 (scale, zero) pairs whose int32 view (one 4-byte load per
    token) is valid: unit last stride, even strides and offset."""
    return (codes.dtype == torch.uint8 and params.dtype == torch.float16 and codes.stride(-1) == 1
            and params.shape == params_shape and params.stride(-1) == 1
            and not any(st % 2 for st in params.stride()[:3]) and params.storage_offset() % 2 == 0)


@triton.jit
def _kv_dequant_kernel(c_ptr, p_ptr, o_ptr, n_slots, H, stride_cb, stride_ch, stride_cs, stride_pb, stride_ph,
                       stride_ps, D: tl.constexpr, BLOCK_S: tl.constexpr, REPEAT: tl.constexpr,
                       ROUND_BF16: tl.constexpr):
    """Slots [0, n_slots) of one (sequence, KV head) -> (code - zero) * scale in the output's dtype, written to
    output heads h * REPEAT .. h * REPEAT + REPEAT - 1 of [B, H * REPEAT, n, D] (REPEAT > 1: K/V expanded for the
    GQA query heads that read them). Grid: (cdiv(n_slots, BLOCK_S), B * H). Low nibbles are dims [0, D/2), high
    nibbles dims [D/2, D)."""
    HALF: tl.constexpr = D // 2
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    slot = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = slot < n_slots
    dd = tl.arange(0, HALF)
    m2 = ok[:, None] & (dd[None, :] >= 0)
    cbase = c_ptr + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
    pbase = p_ptr + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph
    c = tl.load(cbase + slot[:, None] * stride_cs + dd[None, :], mask=m2, other=0)
    scale, zero = _unpack_params(tl.load(pbase + slot * stride_ps, mask=ok, other=0))
    lo = ((c & 15).to(tl.float32) - zero[:, None]) * scale[:, None]
    hi = ((c >> 4).to(tl.float32) - zero[:, None]) * scale[:, None]
    if ROUND_BF16:  # the CPU interpreter's bf16 cast truncates; round to nearest even first
        lo = _round_bf16(lo)
        hi = _round_bf16(hi)
    lo = lo.to(o_ptr.dtype.element_ty)
    hi = hi.to(o_ptr.dtype.element_ty)
    for j in tl.static_range(REPEAT):
        oh = bh.to(tl.int64) * REPEAT + j
        obase = o_ptr + oh * n_slots * D + slot[:, None].to(tl.int64) * D + dd[None, :]
        tl.store(obase, lo, mask=m2)
        tl.store(obase + HALF, hi, mask=m2)


def kv_dequantize(cache: Tensor, params: Tensor, n_slots: int, dtype: torch.dtype, repeat: int = 1) -> Tensor:
    """The first ``n_slots`` slots of a 4-bit cache as a contiguous [B, H_kv * repeat, n_slots, D] tensor of
    ``dtype`` (each KV head ``repeat`` times in a row, as GQA's query heads read them): bit-exact
    ``ops.kv_cache_dequantize(cache, params, 4, n_slots)`` (fp32 maths) rounded to ``dtype``."""
    B, H, S, Dh = cache.shape
    D = 2 * Dh
    if not 0 <= n_slots <= S or D not in (64, 128) or dtype not in _TL_DTYPES or repeat < 1:
        raise NotImplementedError(f"triton kv_dequantize: cache {tuple(cache.shape)}, {n_slots} slots, {dtype}")
    if not _params_readable_as_int32(cache, params, (B, H, S, 2)):
        raise NotImplementedError("triton kv_dequantize: cache layout")
    out = torch.empty(B, H * repeat, n_slots, D, dtype=dtype, device=cache.device)
    if out.numel():
        p32 = params.view(torch.int32)
        BLOCK_S = 64
        _kv_dequant_kernel[(triton.cdiv(n_slots, BLOCK_S), B * H)](
            cache, p32, out, n_slots, H, *cache.stride()[:3], *p32.stride()[:3], D=D, BLOCK_S=BLOCK_S,
            REPEAT=repeat, ROUND_BF16=_interpreting() and dtype == torch.bfloat16, num_warps=4, **_EXACT,
        )
    return out


@triton.jit
def _merge_kernel(o1_ptr, l1_ptr, o2_ptr, l2_ptr, out_ptr, n_rows, T, H,
                  s1_b, s1_h, s1_t, s2_b, s2_h, s2_t, sl1_b, sl1_h, sl1_t, sl2_b, sl2_h, sl2_t, so_b, so_t,
                  D: tl.constexpr, ROWS: tl.constexpr, ROUND_BF16: tl.constexpr):
    """out[b, t, h*D:(h+1)*D] = the softmax-weighted merge of two partial attentions of row (b, h, t) over disjoint
    key sets, from their outputs o1, o2 ([B, H, T, D] strided) and log-sum-exps l1, l2 (natural log).
    Grid: cdiv(B * H * T, ROWS); rows are (b, h, t) in that order."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = rows < n_rows
    r64 = rows.to(tl.int64)
    b = r64 // (H * T)
    h = (r64 // T) % H
    t = r64 % T
    dd = tl.arange(0, D)
    m2 = ok[:, None] & (dd[None, :] >= 0)
    l1 = tl.load(l1_ptr + b * sl1_b + h * sl1_h + t * sl1_t, mask=ok, other=0.0).to(tl.float32)
    l2 = tl.load(l2_ptr + b * sl2_b + h * sl2_h + t * sl2_t, mask=ok, other=0.0).to(tl.float32)
    m = tl.maximum(l1, l2)
    w1 = tl.exp(l1 - m)
    w2 = tl.exp(l2 - m)
    inv = 1.0 / (w1 + w2)
    o1 = tl.load(o1_ptr + (b * s1_b + h * s1_h + t * s1_t)[:, None] + dd[None, :], mask=m2, other=0.0)
    o2 = tl.load(o2_ptr + (b * s2_b + h * s2_h + t * s2_t)[:, None] + dd[None, :], mask=m2, other=0.0)
    o = o1.to(tl.float32) * (w1 * inv)[:, None] + o2.to(tl.float32) * (w2 * inv)[:, None]
    if ROUND_BF16:
        o = _round_bf16(o)
    tl.store(out_ptr + (b * so_b + t * so_t + h * D)[:, None] + dd[None, :], o.to(out_ptr.dtype.element_ty), mask=m2)


# Queries from which a prompt's prefill (or a chunk after a prefix every sequence shares) dequantizes the keys and
# values once and runs cuDNN's flash attention instead of the Triton tensor-core kernel; see attention_quant_kv.
# H100 (bench/diag_dense_prefill_threshold.py, B = 1, 32 heads): at 512 tokens the dense path wins in all four cases
# (MHA / GQA 4, with and without 1024 cached tokens: 1.11-1.50x the tiles), at 256 it loses in three (0.83-0.90x).
DENSE_PREFILL_MIN_T = 512


@functools.lru_cache(maxsize=None)
def _has_cudnn_attention(device_index: int) -> bool:
    """cuDNN's fused attention (the prefix path's log-sum-exp source) needs cuDNN and an sm_80+ GPU."""
    return torch.backends.cudnn.is_available() and torch.cuda.get_device_capability(device_index)[0] >= 8


def takes_dense_prefill(q: Tensor, k_cache: Tensor, prefix_len: int | None) -> bool:
    """Whether ``attention_quant_kv`` dequantizes and calls torch's attention for these arguments."""
    T = q.shape[1]
    if (prefix_len is None or prefix_len < 0 or T < DENSE_PREFILL_MIN_T or prefix_len + T > k_cache.shape[2]
            or q.dtype not in (torch.bfloat16, torch.float16)):
        return False
    if q.is_cuda:  # with no prefix, SDPA picks whatever backend the GPU has
        return prefix_len == 0 or _has_cudnn_attention(q.device.index if q.device.index is not None
                                                       else torch.cuda.current_device())
    return _interpreting()


def _attend_with_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """(softmax(q k^T * scale) v, log-sum-exp) on [B, H, T, D]: cuDNN's flash kernel on a GPU (K/V may have fewer
    heads, GQA), torch's CPU flash kernel elsewhere (under the interpreter; as many K/V heads as query heads)."""
    if q.is_cuda:
        o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                   scale=scale)[:2]
    else:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return o, lse.reshape(q.shape[:3])


def _dense_prefill(q: Tensor, k_cache: Tensor, k_params: Tensor, v_cache: Tensor, v_params: Tensor,
                   prefix_len: int) -> Tensor:
    """Causal attention of T queries after a prefix of ``prefix_len`` keys every sequence holds (0: a prompt's
    prefill, the keys are the T just stored). With no prefix: one SDPA call (is_causal). With one: the queries see
    every prefix key and their own keys causally, two attentions whose outputs merge by their log-sum-exps."""
    B, T, HD = q.shape
    Hkv, D = k_cache.shape[1], 2 * k_cache.shape[3]
    Hq = HD // D
    qh = q.view(B, T, Hq, D).transpose(1, 2)
    if prefix_len == 0:
        k = kv_dequantize(k_cache, k_params, T, q.dtype)
        v = kv_dequantize(v_cache, v_params, T, q.dtype)
        o = torch.nn.functional.scaled_dot_product_attention(qh, k, v, is_causal=True, enable_gqa=Hq != Hkv)
        return o.transpose(1, 2).reshape(B, T, HD)
    L = prefix_len + T
    # cuDNN takes GQA's fewer K/V heads as they are (checked on the H100: identical to expanded heads); torch's CPU
    # kernel gets them expanded
    repeat = 1 if q.is_cuda else Hq // Hkv
    k = kv_dequantize(k_cache, k_params, L, q.dtype, repeat=repeat)  # [B, Hkv * repeat, L, D]
    v = kv_dequantize(v_cache, v_params, L, q.dtype, repeat=repeat)
    scale = 1.0 / math.sqrt(D)
    o1, l1 = _attend_with_lse(qh, k[:, :, :prefix_len], v[:, :, :prefix_len], False, scale)
    o2, l2 = _attend_with_lse(qh, k[:, :, prefix_len:], v[:, :, prefix_len:], True, scale)
    out = torch.empty_like(q)
    n_rows = B * Hq * T
    ROWS = 16
    _merge_kernel[(triton.cdiv(n_rows, ROWS),)](
        o1, l1, o2, l2, out, n_rows, T, Hq, *o1.stride()[:3], *o2.stride()[:3], *l1.stride(), *l2.stride(),
        out.stride(0), out.stride(1), D=D, ROWS=ROWS, ROUND_BF16=_interpreting() and q.dtype == torch.bfloat16,
        num_warps=4,
    )
    return out


def _decode_splits(base_programs: int, max_seqlen: int, block_n: int, n_sm: int, per_sm: int = 4) -> int:
    """Split-KV factor: about ``per_sm`` programs per SM (flash decoding), at most one split per key tile."""
    tiles = triton.cdiv(max(max_seqlen, 1), block_n)
    want = triton.cdiv(per_sm * n_sm, max(base_programs, 1))
    return max(1, min(want, tiles, 64))


def attention_config(q: Tensor, k_cache: Tensor, max_seqlen: int | None = None, num_splits: int | None = None,
                     block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, row_kernel: bool | None = None, acc_rows: int | None = None
                     ) -> dict:
    """The launch configuration ``attention_quant_kv`` uses (also what the kernel table prints).

    ``row_kernel``: one query row per KV head (T = 1 with MHA) runs on CUDA cores (_attn_decode_row_kernel)
    unless this is False; True where there is more than one row raises."""
    B, T, HD = q.shape
    _, Hkv, S, Dh = k_cache.shape
    D = 2 * Dh
    G = HD // D // Hkv
    bound = S if max_seqlen is None else max(1, min(int(max_seqlen), S))
    rows = T * G
    fp32 = q.dtype == torch.float32
    if row_kernel and rows != 1:
        raise ValueError(f"row_kernel needs one query row per KV head, got T * G = {rows}")
    if row_kernel is None:
        row_kernel = rows == 1 and ROW_KERNEL
    if row_kernel:
        # H100 sweep (bench_attention --sweep, MHA B=64 ctx=2048): 16 keys per tile and one warp per program were
        # fastest (216 us vs 220-333 us for other tiles / warps / splits; a register prefetch of the next tile was
        # slower in the first version's sweep)
        block_n = block_n or 16
        num_warps = num_warps or 1
        if num_splits is None:  # one-warp programs: many per SM
            num_splits = _decode_splits(B * Hkv, bound, block_n, num_sms(q.device), ROW_PROGRAMS_PER_SM)
        chunk = triton.cdiv(triton.cdiv(bound, num_splits), block_n) * block_n
        if acc_rows is None:  # the key rows one pass of the CTA's threads covers (16-byte loads along a row)
            acc_rows = min(block_n, max(1, 16 * 32 // (D // 2)) * num_warps)
        if acc_rows < 1 or block_n % acc_rows or acc_rows & (acc_rows - 1):
            raise ValueError(f"acc_rows {acc_rows} must be a power of two dividing block_n {block_n}")
        return dict(row_kernel=True, block_m=1, block_n=block_n, m_tiles=1, num_splits=triton.cdiv(bound, chunk),
                    chunk=chunk, num_warps=num_warps, num_stages=num_stages or 1,
                    acc_rows=acc_rows, maxnreg=None)
    if block_m is None:  # H200 sweep (bench_attention --sweep): prefill best at 64 x 128 with 4 warps
        block_m = max(16, triton.next_power_of_2(rows)) if rows <= 64 else 64
    if block_n is None:
        block_n = 32 if fp32 else 128
    m_tiles = triton.cdiv(rows, block_m)
    if num_splits is None:
        num_splits = _decode_splits(B * Hkv * m_tiles, bound, block_n, num_sms(q.device)) if rows <= 64 else 1
    chunk = triton.cdiv(triton.cdiv(bound, num_splits), block_n) * block_n
    num_splits = triton.cdiv(bound, chunk)
    if num_warps is None:
        # head_dim 64 decode with >= 128 (sequence, KV head) programs: two warps (H100, SmolLM2's 9 / 3 and 8 / 2 heads,
        # batch 64-128, contexts 512-4096: 7-21% faster in 11 of 12 cases, 11% slower in one;
        # bench/diag_gqa_d64_warps.py); fewer programs keep four (two were up to 25% slower at batch 1-16)
        few_rows_d64 = D == 64 and rows <= 16 and B * Hkv * m_tiles >= 128
        num_warps = 8 if block_m >= 128 else 2 if few_rows_d64 else 4
    if num_stages is None:
        num_stages = 2 if block_m >= 128 else 3
    # decode: capping registers at 168 fits 3 programs per SM instead of 2 (H200: 316 vs 340 us, MHA B=64 ctx 2048)
    maxnreg = 168 if (rows <= 64 and not fp32) else None
    return dict(row_kernel=False, acc_rows=None, block_m=block_m, block_n=block_n, m_tiles=m_tiles, num_splits=num_splits,
                chunk=chunk, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)


def attention_quant_kv(q: Tensor, k_cache: Tensor, k_params: Tensor, v_cache: Tensor, v_params: Tensor,
                       kv_lens: Tensor, bits: int = 4, *, max_seqlen: int | None = None, num_splits: int | None = None,
                       block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                       num_stages: int | None = None, maxnreg: int | None = None, row_kernel: bool | None = None,
                       acc_rows: int | None = None, out: Tensor | None = None, prefix_len: int | None = None
                       ) -> Tensor:
    """Causal GQA attention of q [B, T, Hq * D] over the 4-bit cache; query t of sequence b sits at position
    kv_lens[b] - T + t. Same contract as ``ops.attention_quant_kv_reference`` (a row that sees no key gives 0
    where the reference gives NaN).

    ``max_seqlen``: a host hint of max(kv_lens) (default: the cache length S_max) over which the work is split;
    kv_lens is never read on the host, and a hint that is too small costs time, not correctness (the last
    split runs to each sequence's end). One query row per KV head (T = 1 with MHA) runs on CUDA cores
    (``_attn_decode_row_kernel``; ``row_kernel=False`` forces the tensor-core kernel); other T * G <= 64 rows
    (GQA decode, small chunks) use split-KV (flash decoding) and a combine kernel; longer chunks use
    flash-attention tiles of 128 rows, one launch.

    ``prefix_len``: the caller knows that every sequence's cache held exactly ``prefix_len`` keys before this call
    stored its T (kv_lens == prefix_len + T everywhere; 0 for a prompt's prefill). Then, for half-precision queries
    and T >= ``DENSE_PREFILL_MIN_T``, the keys and values are dequantized once (``kv_dequantize``, in q's dtype)
    and cuDNN's flash attention runs the causal attention (2.2x the tensor-core kernel's rate on an H100,
    bench_attention): through SDPA with ``is_causal`` when there is no prefix; as the prefix (all visible) and the
    new keys (causal) attended separately and merged by their log-sum-exps when there is one. The values attended
    are the same 4-bit cache values, rounded to q's dtype.
    """
    if bits != 4:
        raise NotImplementedError(f"triton attention_quant_kv: bits={bits} (4 only)")
    if q.dim() != 3 or k_cache.dim() != 4:
        raise NotImplementedError("triton attention_quant_kv: shapes")
    B, T, HD = q.shape
    Bc, Hkv, S, Dh = k_cache.shape
    D = 2 * Dh
    if D not in (64, 128) or HD % D or (HD // D) % Hkv or Bc != B or v_cache.shape != k_cache.shape:
        raise NotImplementedError(f"triton attention_quant_kv: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")
    if q.dtype not in _TL_DTYPES:
        raise NotImplementedError(f"triton attention_quant_kv: dtype {q.dtype}")
    for c, p in ((k_cache, k_params), (v_cache, v_params)):
        if not _params_readable_as_int32(c, p, (B, Hkv, S, 2)):
            raise NotImplementedError("triton attention_quant_kv: cache layout")
    if not q.is_cuda and not _interpreting():
        raise NotImplementedError("triton attention_quant_kv: needs CUDA tensors (or TRITON_INTERPRET=1)")
    Hq = HD // D
    G = Hq // Hkv
    q = q if q.stride(-1) == 1 else q.contiguous()
    if B and takes_dense_prefill(q, k_cache, prefix_len):
        o = _dense_prefill(q, k_cache, k_params, v_cache, v_params, prefix_len)
        return o if out is None else out.copy_(o)
    o = torch.empty_like(q) if out is None else out
    if B == 0 or T == 0:
        return o
    cfg = attention_config(q, k_cache, max_seqlen, num_splits, block_m, block_n, num_warps, num_stages, row_kernel,
                           acc_rows)
    maxnreg = cfg["maxnreg"] if maxnreg is None else (maxnreg or None)  # maxnreg=0: no cap
    launch = {} if maxnreg is None or interp_mode() else {"maxnreg": maxnreg}
    kp32 = k_params.view(torch.int32)  # [B, Hkv, S, 1]: one 4-byte load per token
    vp32 = v_params.view(torch.int32)
    fp32 = q.dtype == torch.float32
    interp = _interpreting()
    # the CPU interpreter multiplies bf16 tiles as raw integers: it runs the half-precision paths in fp32
    # half inputs on a GPU: fp16 dots (bf16 queries are exact in fp16 over [6e-5, 65504]) fed by _nibbles_f16
    fast = not (fp32 or interp)
    qk_dt = tl.float16 if fast else tl.float32
    pv_dt = tl.float16 if fast else tl.float32
    split = cfg["num_splits"] > 1
    if split:
        po = torch.empty(cfg["num_splits"], B, T, Hq, D, dtype=torch.float32, device=q.device)
        pml = torch.empty(cfg["num_splits"], B, T, Hq, 2, dtype=torch.float32, device=q.device)
    else:
        po = pml = o
    if cfg["row_kernel"]:
        _attn_decode_row_kernel[(B * Hkv, cfg["num_splits"])](
            q, k_cache, kp32, v_cache, vp32, kv_lens, o, po, pml,
            B, Hkv, cfg["chunk"], cfg["num_splits"], LOG2E / math.sqrt(D),
            q.stride(0), o.stride(0),
            *k_cache.stride()[:3], *kp32.stride()[:3], *v_cache.stride()[:3], *vp32.stride()[:3],
            D=D, BLOCK_N=cfg["block_n"], SPLIT=split, OUT_BF16=q.dtype == torch.bfloat16,
            INTERP_LOOP=interp, MAX_TILES=triton.cdiv(S, cfg["block_n"]) if interp else 1,
            UNPACK=UNPACK_CAST if interp else UNPACK_EXACT if fp32 else UNPACK_OFFSET,
            ACC_ROWS=cfg["acc_rows"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch,
        )
    else:
        _attn_fwd_kernel[(cfg["m_tiles"], B * Hkv, cfg["num_splits"])](
            q, k_cache, kp32, v_cache, vp32, kv_lens, o, po, pml,
            B, T, Hkv, cfg["m_tiles"], cfg["chunk"], cfg["num_splits"], LOG2E / math.sqrt(D),
            q.stride(0), q.stride(1), o.stride(0), o.stride(1),
            *k_cache.stride()[:3], *kp32.stride()[:3], *v_cache.stride()[:3], *vp32.stride()[:3],
            GROUP=G, D=D, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], SPLIT=split,
            QK_DTYPE=qk_dt, PV_DTYPE=pv_dt, IEEE=fp32 or interp, OUT_BF16=q.dtype == torch.bfloat16,
            INTERP_LOOP=interp, MAX_TILES=triton.cdiv(S, cfg["block_n"]) if interp else 1, FAST_UNPACK=fast,
            CAUSAL=T > 1, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch,
        )
    if split:
        n_rows = B * T * Hq
        # four rows per program, or one where that would leave SMs idle: at batch 1 the 32 rows of up to 64 splits
        # each went to 8 programs (11 us of a 117 us Llama-7B decode layer on the H100)
        rows = 4 if n_rows >= 4 * num_sms(q.device) else 1
        _combine_kernel[(triton.cdiv(n_rows, rows),)](
            po, pml, o, n_rows, T, Hq, cfg["num_splits"], o.stride(0), o.stride(1),
            D=D, SPLITS_PAD=max(2, triton.next_power_of_2(cfg["num_splits"])), ROWS=rows,
            OUT_BF16=q.dtype == torch.bfloat16, num_warps=4,
        )
    return o


__all__ = ["kv_cache_store_quant", "attention_quant_kv", "attention_config", "kv_dequantize", "takes_dense_prefill"]
