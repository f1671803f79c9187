"""Triton kernels for Atom's fused activation quantizers: RMSNorm / SiLU*mul / gather, then per-token
INT4 groups with INT8 outlier channels, in one pass over each row.

Each function has the arguments and return values of its reference op in ``atom_compile/ops.py``
(``rms_norm_quant_reference``, ``silu_mul_quant_reference``, ``gather_quant_reference``) and writes
the qtensor layout of ``atom_compile/quant.py``:

- ``q``              int8 [..., Kn/2]: INT4 codes in [-8, 7], half-split nibbles per group (byte j of
                     a group holds channel j in bits 0-3 and channel j + g/2 in bits 4-7);
- ``scales``         float32 [..., Kn/g]: (absmax * clip) / 7 per token and group;
- ``outliers``       int8 [..., n_out]: the last n_out channels, one symmetric INT8 group per token;
- ``outlier_scales`` float32 [..., 1]: absmax / 127 (ones when n_out == 0).

Supported: fmt "int4", outlier_format "int8" (or anything when n_out == 0), group_size 64 or 128,
n_out in {0, 64, 128} (any power of two <= 256), any K with (K - n_out) % group_size == 0,
bf16 / fp16 / fp32 inputs. Anything else raises NotImplementedError: the lowering then falls back to
the reference op.

Numerics (what the tests check, on the CPU interpreter and on a GPU, always against the reference run
on the CPU: torch's CUDA kernels compute ``tensor / python_scalar`` as a multiply by the reciprocal, so
the reference run on a GPU is itself one ulp off its definition now and then):

- The quantization is exact: scale = div_rn(absmax * clip, 7) in fp32; codes = round half to even of
  the correctly rounded x / scale, clamped. On a GPU the quotient is x * r plus one FMA correction
  (r = div_rn(1, scale) once per group, see ``_div_rn``), and the rounding / clamping / int conversion
  is done on the bits of x / scale + 1.5 * 2^23 (``_magic_codes``). FMA contraction is off. Given the
  same values to quantize, codes and scales equal the reference bit for bit; ``gather_quant`` is
  bit-exact (tested on thousands of rows on the GPU).
- ``rms_norm_quant``: the sum of squares is reduced in another order than torch's and rsqrt is the
  device's, so rstd can differ from the reference's by a few fp32 ulps. After the cast to the input
  dtype that rarely changes a normalized value, and then by one unit in its last place, which the
  weight (up to 2) can turn into two units of weight * normed. Bound (tested): every code within one of
  the reference's and fewer than 0.1% differ; every scale within a relative 2^-6 (bf16), 2^-9 (fp16),
  2^-20 (fp32) of the reference's (two units in the last place), and for bf16 / fp16 at most
  max(1, 0.1%) of the scales not bit-equal (measured on the H200 and the interpreter: none differ in
  the bench / test shapes for bf16).
- ``silu_mul_quant``: SiLU is x / (1 + exp(-x)) with the device's fast exp and division (numpy's under
  the interpreter) against torch's: the same bound as ``rms_norm_quant``.

Performance (H100, bf16, 16k x 4096, bench/bench_quantize.py): silu_mul_quant at 94% of the copy bandwidth.
With an arbitrary channel order (Atom's score order) rms_norm_quant 55% and gather_quant 66%: the channel gather
(``tl.gather``) goes through shared memory with barriers around it (two rows per round trip, see
_row_gather_quant_kernel), and at ~32 instructions per element and 2 programs per SM the kernel is issue- and
latency-bound. With an order whose groups are made of runs of consecutive channels (the default
``channel_order="chunks"``: score-sorted runs of 16; ``"blocks"``: one run per group; pass a ``BlockPlan`` from
``plan_blocks`` as ``perm``, as the lowering does) _row_blocks_quant_kernel loads the runs and patches the few
swapped channels from a table: 75.5% / 86.3% (chunks), 78.2% / 91.6% (blocks).
See docs/performance.md.
"""

from __future__ import annotations

import collections
import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import fp8_blockscaled
from .device_info import num_sms
from .fp8_blockscaled import _e4m3_bytes

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
# exact maths only: no FMA contraction, no flush-to-zero in libdevice's div_rn
_EXACT = {"enable_fp_fusion": False, "enable_reflect_ftz": False}


# ============================================================================ device helpers
@triton.jit
def _round_to(x, DTYPE: tl.constexpr, NATIVE: tl.constexpr):
    """fp32 x rounded to DTYPE (round to nearest even), returned as fp32.

    On a GPU (NATIVE) the hardware cast; under the CPU interpreter bf16 is rounded with integer ops on the
    fp32 bits, because the interpreter's fp32 -> bf16 cast truncates.
    """
    if DTYPE == tl.bfloat16:
        if NATIVE:
            return x.to(tl.bfloat16).to(tl.float32)
        else:
            u = x.to(tl.uint32, bitcast=True)
            u = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000
            return u.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _div_rn(y, s, r, NATIVE: tl.constexpr):
    """y / s correctly rounded, given r = div_rn(1, s) computed once per group.

    GPU: q0 = y * r, then one Markstein correction q0 + r * (y - s * q0) with two FMAs; with r the
    correctly rounded reciprocal this is the correctly rounded quotient for operands away from the
    overflow / underflow range (what CUDA's own div.rn fast path does, without its per-element
    reciprocal, range check and slow path). The interpreter has no single-rounding FMA: it divides.
    """
    if NATIVE:
        q0 = y * r
        return tl.fma(r, tl.fma(-s, q0, y), q0)
    else:
        return tl.math.div_rn(y, s)


@triton.jit
def _magic_codes(v, QMIN: tl.constexpr, QMAX: tl.constexpr, CLAMP_LOW: tl.constexpr = True):
    """round-half-even(v) clamped to [QMIN, QMAX], as int32 two's complement in the low bits.

    v + 1.5 * 2^23 rounds v to an integer (ties to even) in the low mantissa bits; clamping in that
    domain and reading the bits skips the float -> int conversion (quarter rate). CLAMP_LOW=False skips the
    lower clamp, for callers that know v >= QMIN - 0.5.
    """
    w = v + 12582912.0
    if CLAMP_LOW:
        w = tl.maximum(w, 12582912.0 + QMIN)
    w = tl.minimum(w, 12582912.0 + QMAX)
    return w.to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def _int4_group_codes(y_lo, y_hi, clip, scale_ptrs, q_ptrs, mask2d, gmask, NATIVE: tl.constexpr,
                      X16: tl.constexpr = False, HALF: tl.constexpr = 64, CLAMP_LOW: tl.constexpr = True):
    """Quantize a tile of groups [G, g/2] x 2 (low / high halves), store scales and packed bytes, or with X16
    16 * code as int8 at q_ptrs (low half) and q_ptrs + HALF (high half) (the W4A4 GEMM's MMA operand), or with
    X16 == 2 the codes' e4m3 bytes at the same places (the cuBLAS block-scaled GEMM's operand)."""
    amax = tl.maximum(tl.max(tl.abs(y_lo), axis=1), tl.max(tl.abs(y_hi), axis=1))
    # (masked groups divide 1, not 0: a zero dividend takes div.rn's slow path, in the whole warp that holds it)
    scale = tl.math.div_rn(tl.where(gmask, amax, 1.0) * clip, 7.0)
    tl.store(scale_ptrs, scale, mask=gmask)
    s = tl.where(scale > 0, scale, 1.0)
    r = tl.math.div_rn(1.0, s)[:, None]
    s = s[:, None]
    # CLAMP_LOW=False (clip >= 0.85): |y / s| <= 7 / clip < 8.5, so the codes are >= -8 already
    c_lo = _magic_codes(_div_rn(y_lo, s, r, NATIVE), -8, 7, CLAMP_LOW)
    c_hi = _magic_codes(_div_rn(y_hi, s, r, NATIVE), -8, 7, CLAMP_LOW)
    if X16 == 2:
        tl.store(q_ptrs, _e4m3_bytes(c_lo), mask=mask2d)
        tl.store(q_ptrs + HALF, _e4m3_bytes(c_hi), mask=mask2d)
    elif X16:
        tl.store(q_ptrs, (c_lo * 16).to(tl.int8), mask=mask2d)
        tl.store(q_ptrs + HALF, (c_hi * 16).to(tl.int8), mask=mask2d)
    else:
        byte = (c_lo & 15) | ((c_hi & 15) << 4)
        tl.store(q_ptrs, byte.to(tl.int8), mask=mask2d)


@triton.jit
def _int8_outliers(y, o_ptrs, os_ptr, omask, row_ok, NATIVE: tl.constexpr):
    amax = tl.max(tl.abs(y), axis=0)
    scale = tl.math.div_rn(amax, 127.0)
    tl.store(os_ptr, scale, mask=row_ok)
    s = tl.where(scale > 0, scale, 1.0)
    r = tl.math.div_rn(1.0, s)
    c = _magic_codes(_div_rn(y, s, r, NATIVE), -128, 127)
    tl.store(o_ptrs, c.to(tl.int8), mask=omask)


# ============================================================================ whole-row kernel
@triton.jit
def _bits16_to_f32(v, X_DTYPE: tl.constexpr):
    """A 16-bit float's bits in the low half of int32 v -> its value in fp32 (exact)."""
    if X_DTYPE == tl.bfloat16:
        return (v << 16).to(tl.float32, bitcast=True)
    else:
        return (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _quantize_gathered_row(y_lo, y_hi, y_o, rstd, w_lo, w_hi, w_o, row, M, clip,
                           q_ptr, s_ptr, o_ptr, os_ptr, stride_qm, stride_sm, stride_om, stride_osm,
                           gi, qcol, mask2d, gmask, offs_o,
                           NORM: tl.constexpr, X_DTYPE: tl.constexpr, Y_DTYPE: tl.constexpr, N_OUT: tl.constexpr,
                           NATIVE: tl.constexpr, X16: tl.constexpr, HALF: tl.constexpr):
    """The gathered row (input values: [G, g/2] low / high halves of each group, the outliers) -> RMSNorm's
    round(weight * round(x * rstd)) when NORM (elementwise, so the same after the gather as before it) ->
    INT4 groups and the INT8 outlier group, stored."""
    rmask = row < M
    row64 = row.to(tl.int64)
    if NORM:
        y_lo = _round_to(w_lo * _round_to(y_lo * rstd, X_DTYPE, NATIVE), Y_DTYPE, NATIVE)
        y_hi = _round_to(w_hi * _round_to(y_hi * rstd, X_DTYPE, NATIVE), Y_DTYPE, NATIVE)
    _int4_group_codes(y_lo, y_hi, clip, s_ptr + row64 * stride_sm + gi, q_ptr + row64 * stride_qm + qcol,
                      mask2d & rmask, gmask & rmask, NATIVE, X16, HALF)
    if N_OUT > 0:
        if NORM:
            y_o = _round_to(w_o * _round_to(y_o * rstd, X_DTYPE, NATIVE), Y_DTYPE, NATIVE)
        _int8_outliers(y_o, o_ptr + row64 * stride_om + offs_o, os_ptr + row64 * stride_osm,
                       (offs_o < N_OUT) & rmask, rmask, NATIVE)


@triton.jit
def _row_gather_quant_kernel(
    x_ptr, w_ptr, perm_ptr, q_ptr, s_ptr, o_ptr, os_ptr,
    M, K, stride_xm, stride_qm, stride_sm, stride_om, stride_osm,
    eps, clip,
    NORM: tl.constexpr,  # RMSNorm before the gather (rms_norm_quant); else a plain gather (gather_quant)
    HAS_PERM: tl.constexpr,
    X_DTYPE: tl.constexpr,  # the normalized row is rounded to the input dtype (as _rms_norm does) ...
    Y_DTYPE: tl.constexpr,  # ... and weight * normed to promote(weight, input)
    K_PAD: tl.constexpr, GROUP: tl.constexpr, N_GROUPS: tl.constexpr, G_PAD: tl.constexpr,
    N_OUT: tl.constexpr, ROWS: tl.constexpr, NATIVE: tl.constexpr,
    X16: tl.constexpr,  # write 16 * code as int8 in channel order instead of packed nibbles
    PAIRS: tl.constexpr,  # 16-bit input: gather two rows at once, their bits packed in one int32
):
    """Rows (tokens) of x in registers: statistics, gather by perm (tl.gather), quantize, store.

    The gather moves the raw input (the RMSNorm maths is elementwise, so it runs on the gathered values); with
    PAIRS the bits of two rows share one int32, so one gather (a shared-memory round trip with barriers) serves
    two rows. Programs take ROWS consecutive rows so that the gather indices and the weight, loaded once, are
    reused; the next row (pair) is loaded before the current one is processed. Grid: (cdiv(M, ROWS),).
    """
    HALF: tl.constexpr = GROUP // 2
    STEP: tl.constexpr = 2 if PAIRS else 1
    pid = tl.program_id(0)
    offs_k = tl.arange(0, K_PAD)
    kmask = offs_k < K
    gi = tl.arange(0, G_PAD)
    gmask = gi < N_GROUPS
    jj = tl.arange(0, HALF)
    # The channel indices stay affine in (group, j) (masking only the loads), so the compiler sees 64
    # contiguous j's per group: the perm load, hence the gathered values, get a layout with each group in
    # one warp (the group max needs no cross-warp reduction).
    ch_lo = gi[:, None] * GROUP + jj[None, :]  # output channel of each (group, j)
    ch_hi = ch_lo + HALF
    mask2d = gmask[:, None] & (jj[None, :] < HALF)
    if HAS_PERM:
        src_lo = tl.load(perm_ptr + ch_lo, mask=mask2d, other=0).to(tl.int32)
        src_hi = tl.load(perm_ptr + ch_hi, mask=mask2d, other=0).to(tl.int32)
    else:
        src_lo = tl.where(mask2d, ch_lo, 0)
        src_hi = tl.where(mask2d, ch_hi, 0)
    # one gather for both halves: (low, high) index pairs side by side (join puts each pair in one thread, so the
    # gathered pairs split back into halves in registers)
    src_pairs = tl.reshape(tl.join(src_lo, src_hi), [G_PAD * GROUP])
    w_lo = 0.0
    w_hi = 0.0
    w_o = 0.0
    if NORM:
        w_lo = tl.load(w_ptr + ch_lo, mask=mask2d, other=0).to(tl.float32)
        w_hi = tl.load(w_ptr + ch_hi, mask=mask2d, other=0).to(tl.float32)
    if X16:
        qcol = gi[:, None] * GROUP + jj[None, :]  # offset of the group's low half in the int8 row
    else:
        qcol = gi[:, None] * HALF + jj[None, :]  # byte offset in the packed row
    offs_o = tl.arange(0, N_OUT if N_OUT > 0 else 1)
    src_o = offs_o
    if N_OUT > 0:
        ch_o = N_GROUPS * GROUP + offs_o
        if HAS_PERM:
            src_o = tl.load(perm_ptr + ch_o).to(tl.int32)
        else:
            src_o = ch_o
        if NORM:
            w_o = tl.load(w_ptr + ch_o).to(tl.float32)
    row0 = pid * ROWS
    xa_next = tl.load(x_ptr + row0.to(tl.int64) * stride_xm + offs_k, mask=kmask & (row0 < M), other=0.0)
    if PAIRS:
        xb_next = tl.load(x_ptr + (row0 + 1).to(tl.int64) * stride_xm + offs_k, mask=kmask & (row0 + 1 < M),
                          other=0.0)
    for r in range(0, ROWS, STEP):
        row = row0 + r
        xa = xa_next
        nxt = row + STEP
        xa_next = tl.load(x_ptr + nxt.to(tl.int64) * stride_xm + offs_k, mask=kmask & (nxt < M) & (r + STEP < ROWS),
                          other=0.0)
        rstd_a = 1.0
        rstd_b = 1.0
        if PAIRS:
            xb = xb_next
            xb_next = tl.load(x_ptr + (nxt + 1).to(tl.int64) * stride_xm + offs_k,
                              mask=kmask & (nxt + 1 < M) & (r + STEP < ROWS), other=0.0)
            bits = (xb.to(tl.int16, bitcast=True).to(tl.int32) << 16) | \
                (xa.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)
            if NORM:
                fa = xa.to(tl.float32)
                fb = xb.to(tl.float32)
                rstd_a = tl.math.rsqrt(tl.sum(fa * fa, axis=0) / K + eps)
                rstd_b = tl.math.rsqrt(tl.sum(fb * fb, axis=0) / K + eps)
            g_lo, g_hi = tl.split(tl.reshape(tl.gather(bits, src_pairs, 0), [G_PAD, HALF, 2]))
            yo_a = 0.0
            yo_b = 0.0
            if N_OUT > 0:  # the outlier channels straight from the rows just read (L1), not another shared-memory pass
                yo_a = tl.load(x_ptr + row.to(tl.int64) * stride_xm + src_o, mask=row < M, other=0.0).to(tl.float32)
                yo_b = tl.load(x_ptr + (row + 1).to(tl.int64) * stride_xm + src_o, mask=row + 1 < M,
                               other=0.0).to(tl.float32)
            _quantize_gathered_row(_bits16_to_f32(g_lo, X_DTYPE), _bits16_to_f32(g_hi, X_DTYPE), yo_a,
                                   rstd_a, w_lo, w_hi, w_o, row, M, clip,
                                   q_ptr, s_ptr, o_ptr, os_ptr, stride_qm, stride_sm, stride_om, stride_osm,
                                   gi, qcol, mask2d, gmask, offs_o, NORM, X_DTYPE, Y_DTYPE, N_OUT, NATIVE, X16, HALF)
            _quantize_gathered_row(_bits16_to_f32(g_lo >> 16, X_DTYPE), _bits16_to_f32(g_hi >> 16, X_DTYPE), yo_b,
                                   rstd_b, w_lo, w_hi, w_o, row + 1, M, clip,
                                   q_ptr, s_ptr, o_ptr, os_ptr, stride_qm, stride_sm, stride_om, stride_osm,
                                   gi, qcol, mask2d, gmask, offs_o, NORM, X_DTYPE, Y_DTYPE, N_OUT, NATIVE, X16, HALF)
        else:
            x = xa.to(tl.float32)
            if NORM:
                rstd_a = tl.math.rsqrt(tl.sum(x * x, axis=0) / K + eps)
            y_lo, y_hi = tl.split(tl.reshape(tl.gather(x, src_pairs, 0), [G_PAD, HALF, 2]))
            y_o = 0.0
            if N_OUT > 0:
                y_o = tl.load(x_ptr + row.to(tl.int64) * stride_xm + src_o, mask=row < M, other=0.0).to(tl.float32)
            _quantize_gathered_row(y_lo, y_hi, y_o,
                                   rstd_a, w_lo, w_hi, w_o, row, M, clip,
                                   q_ptr, s_ptr, o_ptr, os_ptr, stride_qm, stride_sm, stride_om, stride_osm,
                                   gi, qcol, mask2d, gmask, offs_o, NORM, X_DTYPE, Y_DTYPE, N_OUT, NATIVE, X16, HALF)


# ============================================================================ block channel order
_NORM_BF16_ASM = tl.constexpr("""
{
.reg .b32 n, y;
cvt.rn.bf16x2.f32 n, $3, $2;
mul.rn.bf16x2 y, $4, n;
shl.b32 $0, y, 16;
and.b32 $1, y, 0xffff0000;
}
""")


@triton.jit
def _norm_values(x, w, rstd, NORM: tl.constexpr, X_DTYPE: tl.constexpr, Y_DTYPE: tl.constexpr,
                 NATIVE: tl.constexpr):
    """RMSNorm's round(w * round(x * rstd)) in fp32 (NORM), else x. For bf16 on a GPU, w is the bf16 weight and
    both roundings run packed (cvt.rn.bf16x2.f32, then mul.rn.bf16x2: the exact product of two bf16 rounded
    once, as torch's bf16 multiply does), two values per instruction."""
    if NORM:
        if NATIVE and X_DTYPE == tl.bfloat16 and Y_DTYPE == tl.bfloat16:
            return tl.inline_asm_elementwise(_NORM_BF16_ASM, "=r,=r,r,r,r", [x * rstd, w], dtype=tl.float32,
                                             is_pure=True, pack=2)
        return _round_to(w.to(tl.float32) * _round_to(x * rstd, X_DTYPE, NATIVE), Y_DTYPE, NATIVE)
    else:
        return x


PATCH_INLINE = 2  # swaps of a chunk pair placed by its table body's byte selectors (more: a list, one by one)


def _patch_asm(pairs: int) -> str:
    """PTX for a thread's ``pairs`` (1 or 2) chunk pairs: 8 positions of a lo half (from the pos operand of the
    chunk's first element) and the 8 a half group further, their 16-bit values packed 2 per register (lo then hi
    operands -> the two outputs; the pos operand holds the pair's index, -1 for none). The swapped values are
    replaced by the row's (base operand) channels that the BlockPlan's table gives for the chunk pairs.

    A chunk pair's table head (8 bytes: count << 16 | where its body is; the first two swaps' channels, 16 bits
    each) and body (16 bytes: a ``prmt`` byte selector per register, 16 bits, 0x3210 keeping it, that takes each
    16-bit half from the register or from the two inline values packed in one register; then where its further
    swaps are listed). Where every count is 0 a branch skips the rest (the common case: one 8-byte load per pair
    from a small array). Otherwise: the body load and two predicated value loads, one pack and 8 prmt per pair (no
    per-position test, no local memory); swaps past the second (rare: channel | slot << 16) one by one, each a load
    and 8 predicated prmt. ${:uid} makes the labels unique per inlined copy. Operands (Triton's order for pack =
    8 * pairs): outputs lo, hi (4 * pairs registers each), then base, table (8 * pairs 64-bit each, all equal), pair
    (8 * pairs), x lo, x hi (4 * pairs registers each)."""
    P = pairs
    o_base, o_table, o_pos, o_lo, o_hi = 8 * P, 16 * P, 24 * P, 32 * P, 36 * P
    words = [f"h{k}, c{k}, a{k}, b{k}, d{k}, e{k}" for k in range(P)]  # head, channels, selectors
    out = {k: [f"${4 * k + r}" for r in range(4)] + [f"${4 * P + 4 * k + r}" for r in range(4)] for k in range(P)}
    inp = {k: [f"${o_lo + 4 * k + r}" for r in range(4)] + [f"${o_hi + 4 * k + r}" for r in range(4)] for k in range(P)}
    lines = ["{", ".reg .pred p, q, q0, q1;", f".reg .b32 {', '.join(words)}, n, w, c, s, vv, i;",
             ".reg .b64 t, a;", ".reg .b16 v, v0, v1;"]
    lines += [f"mov.b32 ${r}, ${o_lo + r};" for r in range(8 * P)]
    for k in range(P):
        lines += [f"mul.wide.s32 t, ${o_pos + 8 * k}, 8;", f"add.u64 t, t, ${o_table};",
                  f"ld.global.nc.v2.b32 {{h{k}, c{k}}}, [t];"]
    lines += ["mov.b32 c, h0;"] + [f"or.b32 c, c, h{k};" for k in range(1, P)]
    lines += ["shr.u32 c, c, 16;", "setp.eq.b32 p, c, 0;", "@p bra PATCH_DONE_${:uid};"]
    for k in range(P):
        lines += [f"and.b32 c, h{k}, 65535;", "mul.wide.u32 t, c, 4;", f"add.u64 t, t, ${o_table};",
                  f"ld.global.nc.v4.b32 {{a{k}, b{k}, d{k}, e{k}}}, [t];"]
    for k in range(P):
        lines += [f"shr.u32 n, h{k}, 16;", "setp.gt.u32 q0, n, 0;", "setp.gt.u32 q1, n, 1;", "mov.b16 v0, 0;",
                  "mov.b16 v1, 0;",
                  f"and.b32 c, c{k}, 65535;", "mul.wide.u32 a, c, 2;", f"add.u64 a, a, ${o_base};",
                  "@q0 ld.global.nc.b16 v0, [a];",
                  f"shr.u32 c, c{k}, 16;", "mul.wide.u32 a, c, 2;", f"add.u64 a, a, ${o_base};",
                  "@q1 ld.global.nc.b16 v1, [a];", "mov.b32 vv, {v0, v1};"]
        for r, sel in enumerate((f"a{k}", f"a{k}", f"b{k}", f"b{k}", f"d{k}", f"d{k}", f"e{k}", f"e{k}")):
            if r % 2:
                lines += [f"shr.u32 s, {sel}, 16;", f"prmt.b32 {out[k][r]}, {inp[k][r]}, vv, s;"]
            else:
                lines.append(f"prmt.b32 {out[k][r]}, {inp[k][r]}, vv, {sel};")
        # swaps past the second: the list, one at a time (register slot >> 1: 0-3 lo chunk, 4-7 hi chunk)
        lines += [f"setp.le.u32 p, n, {PATCH_INLINE};", f"@p bra PATCH_NEXT{k}_${{:uid}};",
                  f"sub.u32 n, n, {PATCH_INLINE};", f"and.b32 c, h{k}, 65535;", "mul.wide.u32 t, c, 4;",
                  f"add.u64 t, t, ${o_table};", "ld.global.nc.b32 c, [t+16];", "mul.wide.u32 t, c, 4;",
                  f"add.u64 t, t, ${o_table};",
                  f"PATCH_LOOP{k}_${{:uid}}:",
                  "ld.global.nc.b32 w, [t];", "add.u64 t, t, 4;",
                  "and.b32 c, w, 65535;", "mul.wide.u32 a, c, 2;", f"add.u64 a, a, ${o_base};",
                  "ld.global.nc.b16 v, [a];", "cvt.u32.u16 vv, v;",
                  "shr.u32 i, w, 17;", "bfe.u32 c, w, 16, 1;", "setp.ne.u32 q, c, 0;",
                  "selp.b32 s, 21520, 12884, q;"]  # 0x5410: the hi half from the value; 0x3254: the lo half
        for r in range(8):
            lines += [f"setp.eq.u32 q, i, {r};", f"@q prmt.b32 {out[k][r]}, {out[k][r]}, vv, s;"]
        lines += ["sub.u32 n, n, 1;", "setp.ne.u32 p, n, 0;", f"@p bra PATCH_LOOP{k}_${{:uid}};",
                  f"PATCH_NEXT{k}_${{:uid}}:"]
    lines += ["PATCH_DONE_${:uid}:", "}"]
    return "\n".join(lines)


def _patch_constraints(pairs: int) -> str:
    return ",".join(["=r"] * 8 * pairs + ["l"] * 16 * pairs + ["r"] * 16 * pairs)


_PATCH_ASM1, _PATCH_ASM2 = tl.constexpr(_patch_asm(1)), tl.constexpr(_patch_asm(2))
_PATCH_CONSTRAINTS1, _PATCH_CONSTRAINTS2 = tl.constexpr(_patch_constraints(1)), tl.constexpr(_patch_constraints(2))


@triton.jit
def _patch_chunks(row_ptr, table_ptr, pos, src_ptr, x_lo, x_hi, valid, HALF: tl.constexpr, PAIRS: tl.constexpr):
    """(x_lo, x_hi), the values of a tile row's groups at positions pos and pos + HALF, with the swapped ones replaced
    by the row's channels that the order puts there (``BlockPlan``).

    PAIRS (1 or 2, set by the host to what the tile's layout gives each thread: 8 or 16 consecutive positions of a
    lo half and of a hi half, in aligned chunks of 8): on a GPU an elementwise asm block per thread's PAIRS chunk
    pairs reads the plan's table (``_patch_asm``): an 8-byte load per pair and a branch when none holds a swap. A
    tl.load with per-element addresses would also make Triton pick another register layout for the tile, one that
    spreads a group over the warps, and convert everything to it. PAIRS = 0 (the interpreter, fp32 rows, tiles too
    small for 8 positions a thread): per-position loads through ``src`` (channel + 1, 0 where the block's own
    channel stays). ``valid`` False leaves x as it is (rows past M, padded groups)."""
    if PAIRS > 0:
        base = tl.zeros_like(pos).to(tl.int64) + row_ptr.to(tl.int64)
        table = tl.zeros_like(pos).to(tl.int64) + (table_ptr + 2).to(tl.int64)  # (past head 0: no swap)
        pair = tl.where(valid, (pos // (2 * HALF)) * (HALF // 8) + (pos % (2 * HALF)) // 8, -1)
        if PAIRS == 2:
            return tl.inline_asm_elementwise(_PATCH_ASM2, _PATCH_CONSTRAINTS2, [base, table, pair, x_lo, x_hi],
                                             dtype=(x_lo.dtype, x_hi.dtype), is_pure=True, pack=16)
        else:
            return tl.inline_asm_elementwise(_PATCH_ASM1, _PATCH_CONSTRAINTS1, [base, table, pair, x_lo, x_hi],
                                             dtype=(x_lo.dtype, x_hi.dtype), is_pure=True, pack=8)
    else:
        s_lo = tl.load(src_ptr + pos, mask=valid, other=0)
        s_hi = tl.load(src_ptr + pos + HALF, mask=valid, other=0)
        x_lo = tl.load(row_ptr + s_lo - 1, mask=s_lo != 0, other=x_lo)
        x_hi = tl.load(row_ptr + s_hi - 1, mask=s_hi != 0, other=x_hi)
        return x_lo, x_hi


@triton.jit
def _run_columns(starts_ptr, gi, first_run, GROUP: tl.constexpr, G_PAD: tl.constexpr):
    """[G_PAD, GROUP / 2] the input channel each position of a half group loads: its run's start (``BlockPlan.
    run_starts``, runs first_run .. first_run + GROUP / 16 of each group) + position % 8. The starts are loaded as a
    [G_PAD, GROUP / 16] tile and broadcast over each run's 8 positions, so that a thread loads only the starts of its
    own runs (H100, 16k x 4096, chunk order: the per-position table this replaced, of which each thread used one
    entry per run, took 76.2-76.7 us against 75.1-75.5 us; ncu: `bench/adhoc/ncu_cols_vs_blocks/`)."""
    HALF: tl.constexpr = GROUP // 2
    rr = tl.arange(0, HALF // 8)
    starts = tl.load(starts_ptr + gi[:, None] * (GROUP // 8) + first_run + rr[None, :])
    cols = tl.reshape(tl.broadcast_to(starts[:, :, None], (G_PAD, HALF // 8, 8)), (G_PAD, HALF))
    return tl.max_contiguous(tl.multiple_of(cols + tl.arange(0, HALF)[None, :] % 8, [1, 8]), [1, 8])


@triton.jit
def _row_blocks_quant_kernel(
    x_ptr, w_ptr, base_ptr, starts_ptr, src_ptr, table_ptr, outl_ptr, q_ptr, s_ptr, o_ptr, os_ptr,
    M, K, stride_xm, stride_qm, stride_sm, stride_om, stride_osm,
    eps, clip,
    NORM: tl.constexpr, X_DTYPE: tl.constexpr, Y_DTYPE: tl.constexpr,
    GROUP: tl.constexpr, N_GROUPS: tl.constexpr, G_PAD: tl.constexpr, N_OUT: tl.constexpr,
    ROWS: tl.constexpr, NATIVE: tl.constexpr, X16: tl.constexpr, PREFETCH: tl.constexpr, CLAMP_LOW: tl.constexpr,
    PATCH_PAIRS: tl.constexpr, BLOCKS: tl.constexpr,
):
    """rms_norm_quant / gather_quant for a channel order whose normal groups are made of runs of 8 consecutive
    input channels (8-aligned) with a few channels swapped in (``BlockPlan``; ``channel_order="blocks"`` and
    ``"chunks"`` make such orders).

    Group g is loaded as GROUP / 8 runs x[s : s + 8], s = run_starts[g * GROUP / 8 + c] (16-byte loads, no gather;
    one run of GROUP for a block order); at the positions where the order takes another channel that channel's value
    is loaded and put in place (``_patch_chunks``: from the plan's table, in registers). Everything stays in the
    tile's layout, where a group sits in one warp, so the group maxima need no shared memory. Programs take ROWS
    consecutive rows (with PREFETCH the next row's runs are loaded before the current one is processed).
    Grid: (cdiv(M, ROWS),).
    """
    HALF: tl.constexpr = GROUP // 2
    pid = tl.program_id(0)
    gi = tl.arange(0, G_PAD)
    gmask = gi < N_GROUPS
    jj = tl.arange(0, HALF)
    mask2d = gmask[:, None] & (jj[None, :] < HALF)
    pos_lo = gi[:, None] * GROUP + jj[None, :]  # reordered position (the weight and src are there)
    # the input channel each position loads (padded groups: 0, their loads are masked)
    if BLOCKS:  # each group one run: one start per group (the per-position table this path predates cost ~2 us)
        base = tl.multiple_of(tl.load(base_ptr + gi), GROUP)
        col_lo = base[:, None] + jj[None, :]
        col_hi = col_lo + HALF
    else:  # runs of 8 from 8-aligned channels: each thread loads its runs' starts (one 8-byte load for 16 positions)
        col_lo = _run_columns(starts_ptr, gi, 0, GROUP, G_PAD)
        col_hi = _run_columns(starts_ptr, gi, HALF // 8, GROUP, G_PAD)
    w_lo = 1.0
    w_hi = 1.0
    w_o = 1.0
    if NORM:  # (in the weight's dtype: _norm_values converts)
        w_lo = tl.load(w_ptr + pos_lo, mask=mask2d, other=0.0)
        w_hi = tl.load(w_ptr + pos_lo + HALF, mask=mask2d, other=0.0)
    if X16:
        qcol = gi[:, None] * GROUP + jj[None, :]
    else:
        qcol = gi[:, None] * HALF + jj[None, :]
    offs_o = tl.arange(0, N_OUT if N_OUT > 0 else 1)
    if N_OUT > 0:
        outl = tl.load(outl_ptr + offs_o)
        if NORM:
            w_o = tl.load(w_ptr + N_GROUPS * GROUP + offs_o)
    row0 = pid * ROWS
    if PREFETCH:
        xrow = x_ptr + row0.to(tl.int64) * stride_xm
        xl_next = tl.load(xrow + col_lo, mask=mask2d & (row0 < M), other=0.0)
        xh_next = tl.load(xrow + col_hi, mask=mask2d & (row0 < M), other=0.0)
    for r in range(0, ROWS):
        row = row0 + r
        rmask = row < M
        row64 = row.to(tl.int64)
        xrow = x_ptr + row64 * stride_xm
        if PREFETCH:  # the next row's runs are requested before this one is processed
            x_lo = xl_next
            x_hi = xh_next
            nxt = x_ptr + (row64 + 1) * stride_xm
            nmask = mask2d & (row + 1 < M) & (r + 1 < ROWS)
            xl_next = tl.load(nxt + col_lo, mask=nmask, other=0.0)
            xh_next = tl.load(nxt + col_hi, mask=nmask, other=0.0)
        else:
            x_lo = tl.load(xrow + col_lo, mask=mask2d & rmask, other=0.0)
            x_hi = tl.load(xrow + col_hi, mask=mask2d & rmask, other=0.0)
        x_o = 0.0
        if N_OUT > 0:  # (requested before the patch: its branch would hold the load back until the runs are in)
            x_o = tl.load(xrow + outl, mask=rmask, other=0.0).to(tl.float32)
        x_lo, x_hi = _patch_chunks(xrow, table_ptr, pos_lo, src_ptr, x_lo, x_hi, mask2d & rmask, HALF, PATCH_PAIRS)
        x_lo = x_lo.to(tl.float32)
        x_hi = x_hi.to(tl.float32)
        rstd = 1.0
        if NORM:
            ss = tl.sum(tl.sum(tl.fma(x_lo, x_lo, x_hi * x_hi), axis=1), axis=0)  # (H100: 1% faster than * +)
            if N_OUT > 0:
                ss += tl.sum(x_o * x_o, axis=0)
            rstd = tl.math.rsqrt(ss / K + eps)
        y_lo = _norm_values(x_lo, w_lo, rstd, NORM, X_DTYPE, Y_DTYPE, NATIVE)
        y_hi = _norm_values(x_hi, w_hi, rstd, NORM, X_DTYPE, Y_DTYPE, NATIVE)
        _int4_group_codes(y_lo, y_hi, clip, s_ptr + row64 * stride_sm + gi, q_ptr + row64 * stride_qm + qcol,
                          mask2d & rmask, gmask & rmask, NATIVE, X16, HALF, CLAMP_LOW)
        if N_OUT > 0:
            y_o = _norm_values(x_o, w_o, rstd, NORM, X_DTYPE, Y_DTYPE, NATIVE)
            _int8_outliers(y_o, o_ptr + row64 * stride_om + offs_o, os_ptr + row64 * stride_osm,
                           (offs_o < N_OUT) & rmask, rmask, NATIVE)


# ============================================================================ SiLU * up, chunked
@triton.jit
def _silu_mul(g, u, H_DTYPE: tl.constexpr, NATIVE: tl.constexpr):
    """F.silu(gate) * up as torch computes it: silu in fp32 rounded to the dtype, then the product.

    exp and the division are the fast ones (ex2.approx, div.full): the result can differ from torch's in
    the last fp32 bits, which the bf16 / fp16 rounding nearly always absorbs (see the module docstring)."""
    s = _round_to(g / (1.0 + tl.exp(-g)), H_DTYPE, NATIVE)
    return _round_to(s * u, H_DTYPE, NATIVE)


@triton.jit
def _silu_mul_quant_kernel(
    g_ptr, u_ptr, q_ptr, s_ptr, o_ptr, os_ptr,
    M, stride_gm, stride_um, stride_qm, stride_sm, stride_om, stride_osm,
    clip,
    H_DTYPE: tl.constexpr, GROUP: tl.constexpr, N_GROUPS: tl.constexpr, GB: tl.constexpr, N_OUT: tl.constexpr,
    NATIVE: tl.constexpr, X16: tl.constexpr, CHUNKS: tl.constexpr,
):
    """Programs take a row, or with CHUNKS > 1 a chunk of ceil(N_GROUPS / CHUNKS) groups of a row (small M:
    more programs than rows); the groups are streamed GB at a time (no perm: SiLU*up already comes out in
    down_proj's order); the outliers are the last chunk's. Grid: (M, CHUNKS)."""
    HALF: tl.constexpr = GROUP // 2
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    PER_CHUNK: tl.constexpr = (N_GROUPS + CHUNKS - 1) // CHUNKS
    gb = tl.arange(0, GB)
    jj = tl.arange(0, HALF)
    for step in range(0, PER_CHUNK, GB):  # (constexpr bounds: the interpreter takes no tensor range() bound)
        gi = chunk * PER_CHUNK + step + gb
        gmask = (gi < N_GROUPS) & (gi < (chunk + 1) * PER_CHUNK)
        mask2d = gmask[:, None] & (jj[None, :] >= 0)
        col = gi[:, None] * GROUP + jj[None, :]
        gl = tl.load(g_ptr + row * stride_gm + col, mask=mask2d, other=0.0).to(tl.float32)
        ul = tl.load(u_ptr + row * stride_um + col, mask=mask2d, other=0.0).to(tl.float32)
        gh = tl.load(g_ptr + row * stride_gm + col + HALF, mask=mask2d, other=0.0).to(tl.float32)
        uh = tl.load(u_ptr + row * stride_um + col + HALF, mask=mask2d, other=0.0).to(tl.float32)
        y_lo = _silu_mul(gl, ul, H_DTYPE, NATIVE)
        y_hi = _silu_mul(gh, uh, H_DTYPE, NATIVE)
        _int4_group_codes(y_lo, y_hi, clip, s_ptr + row * stride_sm + gi,
                          q_ptr + row * stride_qm + gi[:, None] * (GROUP if X16 else HALF) + jj[None, :], mask2d, gmask,
                          NATIVE, X16, HALF)
    if N_OUT > 0 and chunk == CHUNKS - 1:
        offs_o = tl.arange(0, N_OUT)
        col_o = N_GROUPS * GROUP + offs_o
        y_o = _silu_mul(tl.load(g_ptr + row * stride_gm + col_o).to(tl.float32),
                        tl.load(u_ptr + row * stride_um + col_o).to(tl.float32), H_DTYPE, NATIVE)
        _int8_outliers(y_o, o_ptr + row * stride_om + offs_o, os_ptr + row * stride_osm, offs_o < N_OUT, row >= 0,
                       NATIVE)


# ============================================================================ host side
def _check(x: Tensor, fmt: str, group_size: int, n_outliers: int, outlier_format: str) -> tuple[int, int]:
    """(K, n_groups) of a supported configuration; NotImplementedError otherwise."""
    if x.dtype not in _TL_DTYPES:
        raise NotImplementedError(f"triton quantizer: input dtype {x.dtype} (bf16, fp16, fp32 only)")
    if fmt != "int4":
        raise NotImplementedError(f"triton quantizer: fmt {fmt!r} (int4 only)")
    if group_size not in (64, 128):
        raise NotImplementedError(f"triton quantizer: group_size {group_size} (64 or 128)")
    if n_outliers and outlier_format != "int8":
        raise NotImplementedError(f"triton quantizer: outlier_format {outlier_format!r} (int8 only)")
    if n_outliers < 0 or n_outliers > 256 or (n_outliers & (n_outliers - 1)):
        raise NotImplementedError(f"triton quantizer: n_outliers {n_outliers} (0 or a power of two <= 256)")
    K = x.shape[-1]
    Kn = K - n_outliers
    if Kn <= 0 or Kn % group_size:
        raise NotImplementedError(f"triton quantizer: {K} - {n_outliers} channels are not groups of {group_size}")
    if not x.is_cuda and not _interpreting():
        raise NotImplementedError("triton quantizer: needs a CUDA tensor (or TRITON_INTERPRET=1)")
    return K, Kn // group_size


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _x16_mode(x16) -> int:
    """The kernels' X16 constexpr: 0 packed nibbles, 1 int8 16 * code, 2 e4m3 codes (``x16="e4m3"``)."""
    if x16 not in (False, True, "e4m3"):
        raise ValueError(f"x16 must be False, True or 'e4m3', got {x16!r}")
    return 2 if x16 == "e4m3" else int(bool(x16))


def _outputs(x2: Tensor, lead, K: int, n_groups: int, group_size: int, n_out: int, outlier_format: str,
             x16: bool = False):
    M = x2.shape[0]
    dev = x2.device
    if x16 == "e4m3":  # the codes' columns of the cuBLAS operand buffer (its outlier blocks are filled later)
        q = fp8_blockscaled.operand_buffer(M, n_groups * group_size, n_out, dev)[:M, : n_groups * group_size]
    else:
        q = torch.empty(M, n_groups * group_size // (1 if x16 else 2), dtype=torch.int8, device=dev)
    scales = torch.empty(M, n_groups, dtype=torch.float32, device=dev)
    if n_out:
        outl = torch.empty(M, n_out, dtype=torch.int8, device=dev)
        os_ = torch.empty(M, 1, dtype=torch.float32, device=dev)
    else:  # what quant.quantize_outliers returns for no outliers
        outl = torch.empty(M, 0, dtype=x2.dtype if outlier_format == "fp16" else torch.int8, device=dev)
        os_ = torch.ones(M, 1, dtype=torch.float32, device=dev)
    return q, scales, outl, os_


def _as_e4m3(q: Tensor, x16) -> Tensor:
    """(The kernels store the e4m3 codes through an int8 view of the buffer; the caller gets them as e4m3.)"""
    return q.view(torch.float8_e4m3fn) if x16 == "e4m3" else q


def _shape(lead, q, scales, outl, os_):
    return (q.reshape(*lead, q.shape[-1]), scales.reshape(*lead, scales.shape[-1]),
            outl.reshape(*lead, outl.shape[-1]), os_.reshape(*lead, 1))


def _rows2d(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _maxnreg(n):
    return {} if n is None or _interpreting() else {"maxnreg": n}

# plan_blocks refuses an order with more swapped positions than this fraction of a group in some group. H100, 16k x
# 4096 (bench_quantize --swap-fractions, bench/results/quantize_h100_blocks.json): with 0 / 3 / 10 / 25% of the
# positions swapped at random the block kernel takes 63 / 75 / 94 / 116 us for rms_norm_quant (gather kernel: 104) and
# 59 / 62 / 78 / 99 us for gather_quant (gather kernel: 88); the most swapped of 31 groups holds ~16% of its positions
# at 10% overall, ~33% at 25%
BLOCK_MAX_SWAPPED_FRACTION = 0.25


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """What ``_row_blocks_quant_kernel`` needs to know about a channel order whose normal groups are made of runs
    of 8 consecutive input channels, 8-aligned, with a few channels swapped in (``plan_blocks``; made once per
    order). Block orders (``channel_order="blocks"``: each group one run of g) and chunk orders
    (``channel_order="chunks"``: runs of 16 sorted by score, in lane pairs inside each group) are such orders.

    Tensors on the order's device: ``run_starts`` int32 [G_PAD * g / 8] the first input channel of each run of 8
    positions (a position loads its run's start + position % 8: ``cols``; padded groups 0); ``src`` int16 [Kn] per
    position 1 + the order's channel where it is not the run's own, else 0 (the interpreter's and fp32 rows' patch);
    ``table`` int32, the GPU patch's (``_patch_table``, read by ``_patch_asm``):
    per chunk pair (8 positions of a lo half and the 8 a half group further; pair i * g / 16 + j / 8 for group i,
    position j) a head (count << 16 | where its body is, the first two swaps' channels) and a body (the registers'
    prmt selectors, where its further swaps are listed; slot 0-7: the lo chunk, 8-15: the hi chunk);
    ``outliers`` int32 [n_out] the order's last n_out channels; ``base`` int32 [G_PAD] when every group is one run
    of g consecutive channels (block orders; the kernel then loads one start per group), else None."""

    K: int
    group_size: int
    n_outliers: int
    run_starts: Tensor
    src: Tensor
    table: Tensor
    outliers: Tensor
    base: Tensor | None = None

    @property
    def cols(self) -> Tensor:
        """[G_PAD * g] the input channel each position loads (padded groups: 0 + position % 8)."""
        return (self.run_starts.repeat_interleave(8) + torch.arange(8, device=self.run_starts.device).repeat(
            len(self.run_starts))).to(torch.int64)

    @property
    def n_groups(self) -> int:
        return (self.K - self.n_outliers) // self.group_size

    @property
    def n_swapped(self) -> int:
        """Positions of the normal groups that hold another channel than their run's."""
        return int((self.src != 0).sum())


def plan_blocks(perm: Tensor, n_outliers: int, group_size: int, max_swapped: int | None = None) -> BlockPlan | None:
    """The BlockPlan of a channel order, or None when its groups are not made of 8-aligned runs of 8 consecutive
    channels with at most ``max_swapped`` (default: ``BLOCK_MAX_SWAPPED_FRACTION`` of the group) positions swapped
    in each: then the gather kernel is used.

    Each run of 8 positions loads the 8-aligned run of channels that most of its positions agree on (perm[8 c + j]
    - j, a multiple of 8; a run that agrees with none loads the channels at its own position, all swapped).
    Reads the order on the host: call it once per order (the lowering does, at bind time), not per call."""
    p = perm.detach().to("cpu", torch.int64).flatten()
    K = p.numel()
    Kn = K - n_outliers
    if group_size % 16 or Kn <= 0 or Kn % group_size or K > 32766:
        return None  # (the patch works on 8-position chunks of each half group; src and the table are 16-bit)
    G = Kn // group_size
    runs = p[:Kn].view(-1, 8)
    off = runs - torch.arange(8)
    valid = (off % 8 == 0) & (off >= 0) & (off <= K - 8)
    start = torch.empty(len(runs), dtype=torch.int64)
    for r, (o, v) in enumerate(zip(off.tolist(), valid.tolist())):
        agree = collections.Counter(x for x, ok in zip(o, v) if ok)
        start[r] = agree.most_common(1)[0][0] if agree else 8 * r  # (first seen wins a tie)
    cols = (start[:, None] + torch.arange(8)).view(G, group_size)
    blocks = p[:Kn].view(G, group_size)
    swapped = blocks != cols
    if max_swapped is None:
        max_swapped = int(group_size * BLOCK_MAX_SWAPPED_FRACTION)
    if int(swapped.sum(1).max()) > max_swapped:
        return None
    dev = perm.device
    g_pad = triton.next_power_of_2(G)
    run_starts = torch.zeros(g_pad * group_size // 8, dtype=torch.int32)
    run_starts[: len(start)] = start.to(torch.int32)
    base = None
    if torch.equal(cols, cols[:, :1] + torch.arange(group_size)) and bool((cols[:, 0] % group_size == 0).all()):
        base = torch.zeros(g_pad, dtype=torch.int32)
        base[:G] = cols[:, 0].to(torch.int32)
        base = base.to(dev)
    return BlockPlan(K=K, group_size=group_size, n_outliers=n_outliers, run_starts=run_starts.to(dev),
                     src=torch.where(swapped, blocks + 1, 0).flatten().to(torch.int16).to(dev),
                     table=_patch_table(blocks, swapped, g_pad).to(dev), outliers=p[Kn:].to(torch.int32).to(dev),
                     base=base)


def _patch_table(blocks: Tensor, swapped: Tensor, g_pad: int) -> Tensor:
    """``BlockPlan.table`` from the order's groups [G, g] and where they hold another channel than their run's."""
    G, g = blocks.shape
    half = g // 2
    n_pairs = g_pad * half // 8
    pos = swapped.flatten().nonzero().flatten()
    j = pos % g
    hi = (j >= half).long()
    jl = j - hi * half
    pair = (pos // g) * (half // 8) + jl // 8  # chunk pair: 8 positions of a lo half and the 8 a half further
    slot = hi * 8 + jl % 8
    order = torch.argsort(pair * 16 + slot)
    pair, slot, channel = pair[order], slot[order], blocks.flatten()[pos][order]
    ids, counts = torch.unique_consecutive(pair, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(pair)) - torch.repeat_interleave(first, counts)
    inline = rank < PATCH_INLINE
    # words, counted from the kernel's table pointer (2 past the start: head 0, for none, is at -2): heads
    # [1 + n_pairs, 2], padded to 16 bytes, then bodies [1 + n_pairs, 8], then the list of further swaps
    heads_len = (2 * (1 + n_pairs) + 3) // 4 * 4
    body0 = heads_len - 2  # where body 0 starts
    heads = torch.zeros(1 + n_pairs, 2, dtype=torch.int64)
    bodies = torch.zeros(1 + n_pairs, 8, dtype=torch.int64)
    # selectors: 0x3210 keeps a register; an inline swap of rank r (value bytes 4 + 2 r, 5 + 2 r of the packed
    # pair) replaces the lo (nibbles 0-1) or hi (nibbles 2-3) half of register slot // 2
    sel = torch.tensor([0, 1, 2, 3]).repeat(1 + n_pairs, 8, 1)
    e = 1 + pair[inline]
    reg, h2, b = slot[inline] // 2, slot[inline] % 2, 4 + 2 * rank[inline]
    sel[e, reg, 2 * h2] = b
    sel[e, reg, 2 * h2 + 1] = b + 1
    selectors = (sel * torch.tensor([1, 16, 256, 4096])).sum(-1)  # [1 + n_pairs, 8] 16-bit selectors
    bodies[:, :4] = selectors[:, 0::2] | (selectors[:, 1::2] << 16)
    heads[:, 0] = body0  # no swap: body 0 (identity selectors; a warp that patches loads it for such pairs too)
    heads[1 + ids, 0] = (body0 + 8 * (1 + ids)) | (counts << 16)
    chans = torch.zeros(1 + n_pairs, PATCH_INLINE, dtype=torch.int64)
    chans[e, rank[inline]] = channel[inline]
    heads[:, 1] = chans[:, 0] | (chans[:, 1] << 16)
    over = (counts - PATCH_INLINE).clamp_min(0)
    bodies[1 + ids, 4] = body0 + 8 * (1 + n_pairs) + torch.cumsum(over, 0) - over
    spill = channel[~inline] | (slot[~inline] << 16)  # the swaps past PATCH_INLINE, in pair order
    pad = torch.zeros(heads_len - 2 * (1 + n_pairs), dtype=torch.int64)
    return torch.cat([heads.flatten(), pad, bodies.flatten(), spill]).to(torch.int32)


def _blocks_launch(x2, weight, eps, plan: BlockPlan, K, n_groups, group_size, n_out, clip, norm, q, scales, outl,
                   os_, ydt, rows_per_program, num_warps, maxnreg, x16, prefetch=None):
    if (plan.K, plan.group_size, plan.n_outliers) != (K, group_size, n_out):
        raise ValueError(f"BlockPlan for K={plan.K}, group {plan.group_size}, {plan.n_outliers} outliers used with "
                         f"K={K}, group {group_size}, {n_out} outliers")
    M = x2.shape[0]
    # H100, 16k x 4096 (bench_quantize, bench/results/quantize_h100_blocks.json): one row per program and no
    # prefetch (64 registers at 4 warps: 8 programs per SM) beat 2-16 rows with or without prefetch; 2 and 4 warps
    # within 3% of each other, 8 slower; at 64 rows (decode) 8 warps
    rows_per_program = rows_per_program or 1
    if num_warps is None:
        num_warps = max(4, min(8, triton.next_power_of_2(K) // 1024)) if M > num_sms(x2.device) else 8
    _row_blocks_quant_kernel[(triton.cdiv(M, rows_per_program),)](
        x2, weight if norm else x2, plan.run_starts if plan.base is None else plan.base, plan.run_starts, plan.src,
        plan.table, plan.outliers, q, scales, outl, os_,
        M, K, x2.stride(0), q.stride(0), scales.stride(0), outl.stride(0), os_.stride(0),
        float(eps), float(clip),
        NORM=norm, X_DTYPE=_TL_DTYPES[x2.dtype], Y_DTYPE=_TL_DTYPES[ydt], GROUP=group_size, N_GROUPS=n_groups,
        G_PAD=triton.next_power_of_2(n_groups), N_OUT=n_out, ROWS=rows_per_program,
        NATIVE=not _interpreting(), X16=_x16_mode(x16), PREFETCH=bool(prefetch), CLAMP_LOW=clip < 0.85,
        PATCH_PAIRS=_patch_pairs(x2, group_size, n_groups, num_warps), BLOCKS=plan.base is not None,
        num_warps=num_warps,
        **_EXACT,
        **_maxnreg(maxnreg),
    )


def _patch_pairs(x2: Tensor, group_size: int, n_groups: int, num_warps: int) -> int:
    """Chunk pairs per thread for the block kernel's asm patch: the [G_PAD, g/2] tile's elements per thread over 8
    (16-bit rows on a GPU; Triton lays 16-byte contiguous runs per thread out first), 0 for the per-position path."""
    per_thread = triton.next_power_of_2(n_groups) * (group_size // 2) // (32 * num_warps)
    if _interpreting() or x2.element_size() != 2 or per_thread < 8:
        return 0
    return 2 if per_thread % 16 == 0 else 1


def _row_launch(x, weight, eps, perm, K, n_groups, group_size, n_out, outlier_format, clip, norm,
                rows_per_program=None, num_warps=None, maxnreg=None, x16=False, pairs=None, prefetch=None):
    lead = x.shape[:-1]
    x2 = _rows2d(x)
    M = x2.shape[0]
    q, scales, outl, os_ = _outputs(x2, lead, K, n_groups, group_size, n_out, outlier_format, x16)
    if M == 0:
        return _shape(lead, _as_e4m3(q, x16), scales, outl, os_)
    plan = perm if isinstance(perm, BlockPlan) else None
    if perm is not None and plan is None:
        if perm.shape != (K,) or perm.dtype not in (torch.int32, torch.int64):
            raise NotImplementedError(f"triton quantizer: perm {tuple(perm.shape)} {perm.dtype}")
        perm = perm.contiguous()
    ydt = x.dtype
    if norm:
        if weight.shape != (K,) or weight.dtype not in _TL_DTYPES:
            raise NotImplementedError(f"triton quantizer: weight {tuple(weight.shape)} {weight.dtype}")
        weight = weight.contiguous()
        ydt = torch.promote_types(x.dtype, weight.dtype)
    if plan is not None:
        _blocks_launch(x2, weight, eps, plan, K, n_groups, group_size, n_out, clip, norm, q, scales, outl, os_, ydt,
                       rows_per_program, num_warps, maxnreg, x16, prefetch)
        return _shape(lead, _as_e4m3(q, x16), scales, outl, os_)
    K_PAD = triton.next_power_of_2(K)
    G_PAD = triton.next_power_of_2(n_groups)
    if rows_per_program is None:
        # each program loads the gather indices and the weight once (40 KB of L2 traffic at K = 4096 with an
        # int64 perm) and reuses them for its rows: as many rows as keep ~2 programs per SM busy
        rows_per_program = 1
        while rows_per_program < 64 and M >= rows_per_program * 2 * 2 * num_sms(x.device):
            rows_per_program *= 2
    if pairs is None:  # (decode-sized M keeps one row per program and more warps per row)
        pairs = x.element_size() == 2 and rows_per_program >= 2
    if pairs and x.element_size() != 2:
        raise ValueError("pairs: 16-bit inputs only")
    if pairs:  # whole pairs per program (an odd count would make a program's last pair spill into the next's rows)
        rows_per_program = max(2, rows_per_program + rows_per_program % 2)
    if num_warps is None:
        num_warps = 4 if K_PAD <= 4096 else 8
        if M <= num_sms(x.device):  # few rows (decode): more warps per row (H100, 64 x 4096: 4.0 vs 4.3 us)
            num_warps = max(num_warps, min(16, K_PAD // 256))
    grid = (triton.cdiv(M, rows_per_program),)
    _row_gather_quant_kernel[grid](
        x2, weight if norm else x2, perm if perm is not None else x2, q, scales, outl, os_,
        M, K, x2.stride(0), q.stride(0), scales.stride(0), outl.stride(0), os_.stride(0),
        float(eps), float(clip),
        NORM=norm, HAS_PERM=perm is not None, X_DTYPE=_TL_DTYPES[x.dtype], Y_DTYPE=_TL_DTYPES[ydt],
        K_PAD=K_PAD, GROUP=group_size, N_GROUPS=n_groups, G_PAD=G_PAD, N_OUT=n_out, ROWS=rows_per_program,
        NATIVE=not _interpreting(), X16=_x16_mode(x16), PAIRS=pairs, num_warps=num_warps, **_EXACT, **_maxnreg(maxnreg),
    )
    return _shape(lead, _as_e4m3(q, x16), scales, outl, os_)


def rms_norm_quant(x: Tensor, weight: Tensor, eps: float, perm: Tensor | BlockPlan | None, fmt: str, group_size: int,
                   n_outliers: int, outlier_format: str, clip: float, *, rows_per_program: int | None = None,
                   num_warps: int | None = None, maxnreg: int | None = None, x16: bool = False,
                   pairs: bool | None = None, prefetch: bool | None = None):
    """RMSNorm (fp32 statistics, cast to x.dtype, times weight) + gather by perm + INT4/INT8 quantization.

    Same contract as ``ops.rms_norm_quant_reference``; returns (q, scales, outliers, outlier_scales).
    One program holds a whole row in registers: one read of x, one write of each output.
    ``x16``: q is int8 [..., Kn] holding 16 * code in channel order (the W4A4 GEMM's ``x_unpacked`` input)
    instead of the packed nibbles; ``x16="e4m3"``: q is the codes as e4m3, an [M, Kn] view of a fresh cuBLAS
    operand buffer (``fp8_blockscaled.operand_buffer``) that the large-M GEMM completes in place. ``pairs`` (default:
    16-bit inputs): gather two rows per shared-memory round trip; False for the one-row path (A/B timing).
    ``perm`` may be the ``BlockPlan`` of an order (``plan_blocks``): then the block kernel runs (contiguous group
    loads, swapped channels patched); ``prefetch`` (block kernel, rows_per_program > 1): load the next row's runs
    before processing the current one (A/B timing; off by default, slower on the H100).
    """
    K, n_groups = _check(x, fmt, group_size, n_outliers, outlier_format)
    return _row_launch(x, weight, eps, perm, K, n_groups, group_size, n_outliers, outlier_format, clip, True,
                       rows_per_program, num_warps, maxnreg, x16, pairs, prefetch)


def gather_quant(x: Tensor, perm: Tensor | BlockPlan, fmt: str, group_size: int, n_outliers: int, outlier_format: str,
                 clip: float, *, rows_per_program: int | None = None, num_warps: int | None = None,
                 maxnreg: int | None = None, x16: bool = False, pairs: bool | None = None,
                 prefetch: bool | None = None):
    """x[..., perm] quantized per token (the o_proj input). Same contract as ``ops.gather_quant_reference``;
    bit-exact. ``x16``, ``pairs``, a ``BlockPlan`` as ``perm``, ``prefetch``: as in ``rms_norm_quant``."""
    K, n_groups = _check(x, fmt, group_size, n_outliers, outlier_format)
    return _row_launch(x, None, 0.0, perm, K, n_groups, group_size, n_outliers, outlier_format, clip, False,
                       rows_per_program, num_warps, maxnreg, x16=x16, pairs=pairs, prefetch=prefetch)


def silu_mul_quant(gate: Tensor, up: Tensor, fmt: str, group_size: int, n_outliers: int, outlier_format: str,
                   clip: float, *, groups_per_step: int | None = None, num_warps: int | None = None,
                   x16: bool = False, chunks: int | None = None):
    """SiLU(gate) * up quantized per token. Same contract as ``ops.silu_mul_quant_reference``.
    ``x16``: as in ``rms_norm_quant``."""
    K, n_groups = _check(gate, fmt, group_size, n_outliers, outlier_format)
    if up.shape != gate.shape or up.dtype != gate.dtype:
        raise NotImplementedError(f"triton silu_mul_quant: gate {gate.shape} {gate.dtype} vs up {up.shape} {up.dtype}")
    lead = gate.shape[:-1]
    g2, u2 = _rows2d(gate), _rows2d(up)
    M = g2.shape[0]
    q, scales, outl, os_ = _outputs(g2, lead, K, n_groups, group_size, n_outliers, outlier_format, x16)
    if M == 0:
        return _shape(lead, _as_e4m3(q, x16), scales, outl, os_)
    GB = groups_per_step or min(triton.next_power_of_2(n_groups), max(1, 2048 // group_size))
    if chunks is None:  # few rows (decode): split each row over programs so that every SM has work
        chunks = max(1, min(triton.cdiv(n_groups, GB), (4 * num_sms(gate.device)) // M))
    _silu_mul_quant_kernel[(M, chunks)](
        g2, u2, q, scales, outl, os_,
        M, g2.stride(0), u2.stride(0), q.stride(0), scales.stride(0), outl.stride(0), os_.stride(0),
        float(clip),
        H_DTYPE=_TL_DTYPES[gate.dtype], GROUP=group_size, N_GROUPS=n_groups, GB=GB, N_OUT=n_outliers,
        NATIVE=not _interpreting(), X16=_x16_mode(x16), CHUNKS=chunks, num_warps=num_warps or 4, **_EXACT,
    )
    return _shape(lead, _as_e4m3(q, x16), scales, outl, os_)


__all__ = ["rms_norm_quant", "silu_mul_quant", "gather_quant", "BlockPlan", "plan_blocks"]
