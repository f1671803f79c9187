"""Large-M W4A4 GEMM as one block-scaled FP8 GEMM (cuBLAS through ``torch.nn.functional.scaled_mm``).

Why: Atom's GEMM is a sum over groups of 128 channels of (integer group dot) x (token's group scale) x
(row's group scale). That is exactly an FP8 GEMM with 1 x 128 block scales on both operands
(``ScalingType.BlockWise1x128``, DeepSeek-V3's recipe, which cuBLAS runs on Hopper with its own tuned,
warp-specialized kernels), because FP8 e4m3 holds every int4 code -8..7 exactly and a group's integer dot
(|.| <= 128 * 64) is exact in the tensor cores' fp32 accumulation. Our Triton kernel (``w4a4_gemm.py``)
cannot overlap its per-group rescale with the MMAs in Triton 3.6 and reaches 0.76-0.84x bf16 at M = 4096;
cuBLAS's block-scaled kernel reaches 1.3-1.4x bf16 on int4 operands alone, and this path, with the outlier blocks
and the operand passes below, 1.09-1.14x (docs/performance.md, docs/notes_gemm.md v4).

The weights stay 4-bit in memory. Each call unpacks them into a transient e4m3 copy (a bandwidth-bound
Triton kernel: 8.6 us for 4096 x 4096, 62 us for 22016 x 4096 on the H100, bench_gemm's weight_operand_us), which pays off from a few hundred
tokens on (``w4a4_gemm`` uses this path from ``BLOCKSCALED_MIN_M`` tokens).

Operands (K' = Kn + 4 * P, P = n_out rounded up to 128)::

    activations  [M, K'] e4m3: codes of the Kn normal channels | h | h | l | l
    weights      [N, K'] e4m3: codes of the Kn normal channels | h'| l'| h'| l'
    scales       per 128-column block: group scales | 16 s | 16 s | s | s   (weights: 16 s' | s' | 16 s' | s')

INT8 outliers are not exact in e4m3, so each outlier code o is split as o = 16 h + l with l in -8..7 (its low
nibble, sign-extended) and h in -8..8, both exact; the four blocks give 256 hh' + 16 hl' + 16 lh' + ll' = o o'
with the outlier scales folded into the block scales. Every product is exact, as in the reference op; only
the fp32 summation order differs.

The two operand kernels also run under Triton's interpreter (tests check them bit for bit, and the block
decomposition against ``quant_linear_reference``); the GEMM itself is cuBLAS, on the GPU only.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["BLOCK", "supported", "blockscaled_operands", "weight_operand", "weight_scales", "blockscaled_gemm"]

BLOCK = 128  # the scaling block (cuBLAS BlockWise1x128): Atom's group size must be 128


def supported(device: torch.device, group_size: int, N: int, out_dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this path can run: a CUDA device of compute capability 9.x (cuBLAS's block-scaled FP8),
    groups of 128, N a multiple of 16 (FP8 GEMM alignment), bf16 output (cuBLAS refused fp32 output with block
    scales on the H100), and a torch with ``scaled_mm``."""
    if device.type != "cuda" or group_size != BLOCK or N % 16 or out_dtype != torch.bfloat16:
        return False
    return _hopper_with_scaled_mm(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _hopper_with_scaled_mm(index: int) -> bool:
    """(Asked once per device: ``supported`` runs on every large GEMM call.)"""
    return hasattr(torch.nn.functional, "ScalingType") and torch.cuda.get_device_capability(index)[0] == 9


@triton.jit
def _e4m3_bytes(c):
    """Small integer codes (int8 tensor) -> their exact FP8 e4m3 encodings, as int8 bytes."""
    return c.to(tl.float16).to(tl.float8e4nv).to(tl.int8, bitcast=True)


@triton.jit
def _outlier_parts(o):
    """INT8 outlier codes o = 16 h + l -> (h in -8..8, l in -8..7), both exact in e4m3."""
    lo = (o << 4) >> 4  # low nibble, sign-extended (int8 shifts)
    hi = ((o.to(tl.int16) - lo.to(tl.int16)) >> 4).to(tl.int8)
    return hi, lo


@triton.jit
def _operand_kernel(
    q_ptr, o_ptr, s_ptr, os_ptr, dst_ptr, sdst_ptr,
    R, R_out, G, n_out,
    s_q, s_o, s_s, s_dst, s_sdst,
    HALF: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr,
    X16: tl.constexpr, WEIGHT: tl.constexpr, SCALES: tl.constexpr, CODES: tl.constexpr,
):
    """One 128-column block (program axis 1 = group; the last program does the 4 outlier parts) of BLOCK_R
    rows: codes -> e4m3 in dst, and (SCALES) the block scales transposed into sdst [G + 4 P / 128, R].

    q: packed int4 [R, G * HALF] (half-split groups), or with X16 int8 [R, G * 2 * HALF] holding 16 * code.
    o: int8 outliers [R, n_out]; s: group scales [R, G] (row stride s_s); os: outlier scales [R].
    Activations (WEIGHT False) order the outlier parts h | h | l | l, weights h | l | h | l.
    Rows R .. R_out - 1 (padding) are written as zero codes with zero scales.
    Without CODES a quantizer has written the codes of rows < R already (``x16="e4m3"``): only the padding rows'
    codes, the outlier blocks and the scales are written.
    """
    pid_r = tl.program_id(0)
    gi = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rin = rows < R
    rmask = rows < R_out
    r64 = rows[:, None].to(tl.int64)
    dst = dst_ptr + r64 * s_dst
    if gi < G:
        k = tl.arange(0, HALF)
        if not CODES:
            pad = (rmask & ~rin)[:, None]
            zero = tl.zeros([BLOCK_R, HALF], dtype=tl.int8)
            tl.store(dst + gi * 2 * HALF + k[None, :], zero, mask=pad)
            tl.store(dst + gi * 2 * HALF + HALF + k[None, :], zero, mask=pad)
        elif X16:
            src = q_ptr + r64 * s_q + gi * 2 * HALF + k[None, :]
            lo = tl.load(src, mask=rin[:, None], other=0) >> 4
            hi = tl.load(src + HALF, mask=rin[:, None], other=0) >> 4
        else:
            p = tl.load(q_ptr + r64 * s_q + gi * HALF + k[None, :], mask=rin[:, None], other=0)
            lo = (p << 4) >> 4
            hi = p >> 4
        if CODES:
            tl.store(dst + gi * 2 * HALF + k[None, :], _e4m3_bytes(lo), mask=rmask[:, None])
            tl.store(dst + gi * 2 * HALF + HALF + k[None, :], _e4m3_bytes(hi), mask=rmask[:, None])
        if SCALES:
            s = tl.load(s_ptr + rows * s_s + gi, mask=rin, other=0.0)
            tl.store(sdst_ptr + gi * s_sdst + rows, s, mask=rmask)
    else:
        if P > 0:
            c = tl.arange(0, P)
            o = tl.load(o_ptr + r64 * s_o + c[None, :], mask=rin[:, None] & (c[None, :] < n_out), other=0)
            h, l = _outlier_parts(o)
            h8 = _e4m3_bytes(h)
            l8 = _e4m3_bytes(l)
            base = dst + G * 2 * HALF + c[None, :]
            tl.store(base, h8, mask=rmask[:, None])
            if WEIGHT:
                tl.store(base + P, l8, mask=rmask[:, None])
                tl.store(base + 2 * P, h8, mask=rmask[:, None])
            else:
                tl.store(base + P, h8, mask=rmask[:, None])
                tl.store(base + 2 * P, l8, mask=rmask[:, None])
            tl.store(base + 3 * P, l8, mask=rmask[:, None])
            if SCALES:
                so = tl.load(os_ptr + rows, mask=rin, other=0.0)
                NB: tl.constexpr = P // (2 * HALF)
                for j in tl.static_range(4 * NB):
                    big = (j // NB) == 0 or (j // NB) == (2 if WEIGHT else 1)
                    tl.store(sdst_ptr + (G + j) * s_sdst + rows, so * 16.0 if big else so, mask=rmask)


def _padded_outliers(n_out: int) -> int:
    return triton.cdiv(n_out, BLOCK) * BLOCK


def _launch(q, o, s, os_, dst, sdst, R, G, n_out, x16, weight, scales, codes=True):
    block_r = 64
    P = _padded_outliers(n_out)
    R_out = dst.shape[0]
    _operand_kernel[(triton.cdiv(R_out, block_r), G + (1 if P else 0))](
        q, o, s, os_, dst, sdst,
        R, R_out, G, n_out,
        q.stride(0), o.stride(0) if o.numel() else 0, s.stride(0), dst.stride(0), sdst.stride(0),
        HALF=BLOCK // 2, P=P, BLOCK_R=block_r, X16=x16, WEIGHT=weight, SCALES=scales, CODES=codes, num_warps=4)


M_ALIGN = 16  # cuBLAS refused a token count not a multiple of 8 (the scales' leading dimension): rows are padded


def operand_buffer(M: int, Kn: int, n_out: int, device) -> Tensor:
    """An uninitialized activation operand [Mp, K'] (int8 bytes): Mp = M rounded up to M_ALIGN."""
    Mp = triton.cdiv(M, M_ALIGN) * M_ALIGN
    return torch.empty((Mp, Kn + 4 * _padded_outliers(n_out)), dtype=torch.int8, device=device)


def blockscaled_operands(xq: Tensor, xs: Tensor, xo: Tensor, xos: Tensor, x_unpacked: bool) -> tuple[Tensor, Tensor]:
    """Activation qtensor -> (e4m3 operand [Mp, K'] (as int8 bytes), block scales transposed [K' / 128, Mp]),
    Mp = M rounded up to M_ALIGN (the padding rows are zero).

    ``xq`` may be e4m3 codes a quantizer wrote into an ``operand_buffer`` (``x16="e4m3"``: a [M, Kn] view of it);
    then only the padding rows, the outlier blocks and the scales are written, in place."""
    M = xq.shape[0]
    Kn = xq.shape[1] if x_unpacked or xq.dtype == torch.float8_e4m3fn else 2 * xq.shape[1]
    G, n_out = Kn // BLOCK, xo.shape[1]
    if xq.dtype == torch.float8_e4m3fn:
        Mp = triton.cdiv(M, M_ALIGN) * M_ALIGN
        Kt = Kn + 4 * _padded_outliers(n_out)
        if xq.stride() != (Kt, 1) or xq.untyped_storage().nbytes() < xq.storage_offset() + Mp * Kt:
            raise ValueError("e4m3 activations must be the [M, Kn] view of an operand_buffer (x16='e4m3')")
        a8 = torch.as_strided(xq.view(torch.int8), (Mp, Kt), (Kt, 1))
        codes = False
    else:
        a8 = operand_buffer(M, Kn, n_out, xq.device)
        codes = True
    sa_t = torch.empty((a8.shape[1] // BLOCK, a8.shape[0]), dtype=torch.float32, device=xq.device)
    _launch(xq.view(torch.int8) if not codes else xq, xo, xs, xos.reshape(-1), a8, sa_t, M, G, n_out,
            x_unpacked, False, True, codes)
    return a8, sa_t


def weight_operand(wq: Tensor, wo: Tensor, n_out: int) -> Tensor:
    """Packed int4 weight [N, Kn / 2] + int8 outliers [N, >= n_out] -> e4m3 operand [N, K'] (int8 bytes)."""
    N, G = wq.shape[0], 2 * wq.shape[1] // BLOCK
    Kt = G * BLOCK + 4 * _padded_outliers(n_out)
    w8 = torch.empty((N, Kt), dtype=torch.int8, device=wq.device)
    dummy = torch.empty(1, dtype=torch.float32, device=wq.device)
    _launch(wq, wo, dummy, dummy, w8, dummy.reshape(1, 1), N, G, n_out, False, True, False)  # (codes, no scales)
    return w8


def weight_scales(ws_t: Tensor, wos: Tensor, n_out: int) -> Tensor:
    """Weight block scales transposed [K' / 128, N]: the group scales, then 16 s' | s' | 16 s' | s' for the
    outlier parts (built once per weight)."""
    nb = _padded_outliers(n_out) // BLOCK
    if not nb:
        return ws_t.contiguous()
    so = wos.reshape(1, -1).float()
    parts = [16 * so] * nb + [so] * nb + [16 * so] * nb + [so] * nb
    return torch.cat([ws_t] + parts, 0).contiguous()


def blockscaled_gemm(xq: Tensor, xs: Tensor, xo: Tensor, xos: Tensor, prepared, bias: Tensor | None,
                     out_dtype: torch.dtype, out: Tensor | None, x_unpacked: bool) -> Tensor:
    """y = the W4A4 GEMM of ``w4a4_gemm`` through cuBLAS's block-scaled FP8 GEMM (inputs already checked)."""
    F = torch.nn.functional
    pw = prepared
    a8, sa_t = blockscaled_operands(xq, xs, xo, xos, x_unpacked)
    w8 = weight_operand(pw.wq, pw.wo, pw.n_out)
    if pw.fp8_scales is None:  # (built on the first large call, then kept with the weight)
        pw.fp8_scales = weight_scales(pw.ws_t, pw.wos, pw.n_out)
    sb_t = pw.fp8_scales
    fp8 = torch.float8_e4m3fn
    # the bias goes into cuBLAS's epilogue (one rounding to bf16; adding it afterwards rounds twice: 2.3e-3 instead of
    # 1.7e-3 relative error on the H100). cuBLAS takes it in bf16 only.
    y = F.scaled_mm(a8.view(fp8), w8.view(fp8).t(), sa_t.t(), F.ScalingType.BlockWise1x128,
                    sb_t.t(), F.ScalingType.BlockWise1x128,
                    bias=None if bias is None else bias.reshape(-1).to(out_dtype),
                    output_dtype=out_dtype)[: xq.shape[0]]
    if out is not None:
        out.copy_(y)
        return out
    return y
