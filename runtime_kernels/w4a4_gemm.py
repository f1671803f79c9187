"""W4A4 GEMM with INT8 outlier channels (the ``atom::quant_linear`` contract) in Triton, tuned for Hopper.

Contract (act_format="int4", weight_format="int4", outlier_format="int8", rows_per_scale=1), see
``atom_compile.ops.quant_linear_reference``::

    y[m, n] = sum_g (xq_g[m] . wq_g[n]) * xs[m, g] * ws[n, g]  +  (xo[m] . wo[n]) * xos[m] * wos[n]  +  bias[n]

with int32-exact group dot products. Inputs use the project's qtensor layout (``atom_compile.quant``): the
4-bit codes of one group of g channels are packed half-split, byte j = channel j (bits 0-3) and channel
j + g/2 (bits 4-7).

Kernel design
-------------
* Orientation: the kernel computes the transposed tile ``acc[n, m] = W[n, :] . X[m, :]`` ("swap AB"), so the
  weight rows are the MMA's M side (64 rows per warpgroup for wgmma) and the tokens its N side, which can
  be as narrow as 16: decode-sized M does not waste the tensor core's 64-row minimum.
* Operands come in by TMA (host ``TensorDescriptor``s: no per-element address registers, zero fill past
  the edges of M, N and K), software-pipelined ``num_stages`` deep by Triton.
* INT8 tensor cores (wgmma s8, int32 accumulation). Unpacking without interleave: for a packed byte p,
  ``p << 4`` is 16 * (low code) and ``p & 0xF0`` is 16 * (high code), both exact int8 values in
  [-128, 112]. The low nibbles of a group's g/2 bytes are channels 0..g/2-1 and the high nibbles channels
  g/2..g-1, so each group is two K = g/2 int8 dots with no shuffle. On the GPU the masks run as 32-bit
  ``shl``/``and`` on four bytes at a time (inline PTX); under the interpreter as plain int8 tensor ops.
  Both operands carry the factor 16: the int32 dot is 256 x the code dot (|.| <= 2^21) and 1/256 (exact)
  joins the weight scale. FP8 e4m3 operands were measured 2.2-2.5x slower (the int4 -> e4m3 conversion
  costs more than the int -> float conversion it saves); see docs/notes_gemm.md.
* Per-group rescale: ``acc = fma(float(d) * sw[n], sx[m], acc)`` with I2FP (full rate on sm_90): three
  instructions per element and group. ``Config.magic`` selects the magic-number conversion instead
  (IADD + FADD, exact for |d| < 2^22), measured no faster.
* Outliers: one more int8 dot of K = n_out (no unpacking) with the per-row outlier scales, done by the
  last split of a tile or (``Config.out_split``) by one more program per tile.
* Small M (memory-bound): split-K over the groups so that all SMs stream weights; every split writes an
  fp32 partial, and the last program to arrive on a tile (an acq_rel atomic counter per tile) sums the
  partials in split order, adds the bias, writes the output and re-arms the counter. One launch, no host
  synchronization, deterministic summation order.
* Large M (compute-bound): the activations are first unpacked into int8 (x16) by a small kernel
  (``Config.x_unpacked``), so that the activation operand goes from global memory by TMA straight into
  the MMA, and only the weight operand is unpacked in registers (it is wgmma's register operand A).
* From ``BLOCKSCALED_MIN_M`` tokens on (bf16 output, groups of 128, Hopper), ``w4a4_gemm`` without an explicit
  config does not launch this kernel: it runs cuBLAS's block-scaled FP8 GEMM on operands built per call
  (``fp8_blockscaled.py``), which overlaps the per-group rescale with the MMAs as Triton 3.6 cannot (1.09-1.14x
  bf16 at M = 4096 against this kernel's 0.76-0.84x in the same run). ``set_large_m_backend("triton")`` / ATOM_W4A4_LARGE_M=triton
  keep this kernel at every size.

``prepare_weight`` keeps the packed weight bytes as they are, transposes the weight scales to [G, N]
(contiguous per group for a tile of rows) and pads the outlier rows to 16 bytes (TMA row stride).
``w4a4_gemm`` takes an explicit ``Config``, or the autotuned one for the size (``set_autotune(True)`` or
ATOM_W4A4_AUTOTUNE=1: the first call of each (M rounded up to a power of two, N, K) times ``candidates``
in CUDA graphs and keeps the fastest, in memory and in ``autotune_cache_path()`` for the next process on the same
GPU model and software), or else ``pick_config``'s table (the autotuner's H100 choices).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from . import fp8_blockscaled

__all__ = ["PreparedWeight", "Config", "prepare_weight", "w4a4_gemm", "pick_config", "candidates", "set_autotune",
           "autotune_cache_path", "tuned_config",
           "unpack_activations", "set_large_m_backend", "takes_blockscaled_path", "BLOCKSCALED_MIN_M"]

_MAX_TILES = 8192  # split-K arrival counters kept per prepared weight
BLOCKSCALED_MIN_M = 512  # from this many tokens on, w4a4_gemm runs cuBLAS's block-scaled FP8 GEMM (below)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class PreparedWeight:
    """A quantized weight in the kernel's layout (built once, at lowering time)."""

    wq: Tensor  # [N, Kn/2] int8: packed codes, half-split per group (unchanged)
    ws_t: Tensor  # [G, N] float32: weight group scales, transposed
    wo: Tensor  # [N, n_out rounded up to 16] int8 outlier codes (zero columns pad the TMA row stride)
    wos: Tensor  # [N] float32 outlier scales
    counters: Tensor  # [_MAX_TILES] int32, zero between launches (split-K arrival counters)
    group_size: int
    n_out: int

    fp8_scales: Tensor | None = field(default=None, repr=False)  # block scales of the cuBLAS large-M path
    _descs: dict = field(default_factory=dict, repr=False)

    def descriptor(self, block_n: int) -> TensorDescriptor:
        """TMA descriptor of the packed weight for [block_n, g/2] tiles (cached)."""
        d = self._descs.get(block_n)
        if d is None:
            d = self._descs[block_n] = TensorDescriptor.from_tensor(self.wq, [block_n, self.group_size // 2])
        return d

    def outlier_descriptor(self, block_n: int, nout_p: int) -> TensorDescriptor:
        key = ("o", block_n, nout_p)
        d = self._descs.get(key)
        if d is None:
            d = self._descs[key] = TensorDescriptor.from_tensor(self.wo, [block_n, nout_p])
        return d

    @property
    def N(self) -> int:
        return self.wq.shape[0]

    @property
    def groups(self) -> int:
        return self.ws_t.shape[0]



@dataclass(frozen=True)
class Config:
    block_n: int = 64  # weight rows per program (the MMA's M side)
    block_m: int = 16  # tokens per program (the MMA's N side)
    split_k: int = 1  # programs per output tile, each over a contiguous range of groups
    num_warps: int = 4
    num_stages: int = 4
    group_m: int = 8  # tile swizzle: this many token tiles share a sweep over weight tiles (L2 reuse)
    x_unpacked: bool = False  # unpack activations to int8 first (large M)
    magic: bool = False  # magic-number int32 -> fp32 conversion (IADD + FADD) instead of I2FP
    out_split: bool = False  # with split-K: the outlier dot is one more program per tile, not the last split's
    ws: bool = False  # Triton's Hopper warp specialization of the main loop (TMA producer, MMA consumers)
    dot_fp8: bool = False  # FP8 e4m3 tensor-core dots instead of int8 (experiment; not for the interpreter)


def prepare_weight(wq: Tensor, ws: Tensor, wo: Tensor, wos: Tensor, group_size: int) -> PreparedWeight:
    """Weight qtensor (int4 codes, fp32 group scales, int8 outliers, fp32 outlier scales) -> kernel layout."""
    if wq.dtype != torch.int8 or wq.dim() != 2:
        raise ValueError(f"wq must be a 2-D int8 tensor of packed int4 codes, got {wq.dtype} {tuple(wq.shape)}")
    N, kh = wq.shape
    g = group_size
    if g < 32 or g & (g - 1):
        raise ValueError(f"group_size must be a power of two >= 32, got {g}")
    if (2 * kh) % g:
        raise ValueError(f"packed width {kh} is not a whole number of groups of {g}")
    G = 2 * kh // g
    if tuple(ws.shape) != (N, G):
        raise ValueError(f"ws must be [N, G] = [{N}, {G}] (rows_per_scale=1), got {tuple(ws.shape)}")
    if wo.dim() != 2 or wo.shape[0] != N or wo.dtype != torch.int8:
        raise ValueError(f"wo must be int8 [N, n_out], got {wo.dtype} {tuple(wo.shape)}")
    if wos.numel() != N:
        raise ValueError(f"wos must have N = {N} elements, got {tuple(wos.shape)}")
    return PreparedWeight(
        wq=_aligned(wq),
        ws_t=ws.float().t().contiguous(),
        wo=_aligned(_pad16(wo)) if wo.shape[1] else wo.contiguous(),
        wos=wos.float().reshape(N).contiguous(),
        counters=torch.zeros(_MAX_TILES, dtype=torch.int32, device=wq.device),
        group_size=g,
        n_out=wo.shape[1],
    )


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _unpack16(p, USE_ASM: tl.constexpr, DOT_FP8: tl.constexpr):
    """Packed int8 bytes -> (16 * low codes, 16 * high codes) as int8, or (low, high) codes as fp8 e4m3."""
    if DOT_FP8:
        lo = ((p << 4) >> 4).to(tl.float16).to(tl.float8e4nv)
        hi = (p >> 4).to(tl.float16).to(tl.float8e4nv)
    elif USE_ASM:
        lo = tl.inline_asm_elementwise(
            "{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }",
            "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise(
            "and.b32 $0, $1, 0xF0F0F0F0;", "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4)
    else:
        lo = p << 4
        hi = p & -16
    return lo, hi


@triton.jit
def _group_dot(w_desc, x_desc, n0, m0, gi, HALF: tl.constexpr, X_UNPACKED: tl.constexpr, USE_ASM: tl.constexpr,
               DOT_FP8: tl.constexpr):
    """One group's dot product, [BLOCK_N, BLOCK_M]: int32 (256 x the code dot) or fp32 (FP8 dots)."""
    w = w_desc.load([n0, gi * HALF])  # [BLOCK_N, HALF] packed bytes
    wl, wh = _unpack16(w, USE_ASM, DOT_FP8)
    if X_UNPACKED:
        xl = x_desc.load([m0, gi * 2 * HALF])  # [BLOCK_M, HALF] int8, already x16
        xh = x_desc.load([m0, gi * 2 * HALF + HALF])
    else:
        x = x_desc.load([m0, gi * HALF])
        xl, xh = _unpack16(x, USE_ASM, DOT_FP8)
    if DOT_FP8:
        d = tl.dot(wl, tl.trans(xl))
        d = tl.dot(wh, tl.trans(xh), d)
    else:
        d = tl.dot(wl, tl.trans(xl), out_dtype=tl.int32)
        d = tl.dot(wh, tl.trans(xh), d, out_dtype=tl.int32)
    return d


@triton.jit
def _group_scales(sw_base, sx_base, gi, G, N, n_mask, m_mask, K_TAIL: tl.constexpr, DOT_FP8: tl.constexpr):
    """(weight scales of group gi for the tile's rows, activation scales for its tokens)."""
    if K_TAIL:  # the last split may run past G: its extra groups read as zeros (TMA bounds, masks)
        ok = gi < G
        sw = tl.load(sw_base + gi * N, mask=n_mask & ok, other=0.0)
        sx = tl.load(sx_base + gi, mask=m_mask & ok, other=0.0)
    else:
        sw = tl.load(sw_base + gi * N, mask=n_mask, other=0.0)
        sx = tl.load(sx_base + gi, mask=m_mask, other=0.0)
    if not DOT_FP8:
        sw = sw * (1.0 / 256.0)  # both int8 operands carry a factor 16
    return sw, sx


@triton.jit
def _rescale(acc, d, sw, sx, MAGIC: tl.constexpr):
    """acc + float(d) * sw[:, None] * sx[None, :]."""
    if d.dtype == tl.float32:
        f = d
    elif MAGIC:  # exact for |d| < 2^22: the bits of 1.5 * 2^23 + d, read as a float, minus 1.5 * 2^23
        f = (d + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    else:
        f = d.to(tl.float32)
    return tl.fma(f * sw[:, None], sx[None, :], acc)  # no [BLOCK_N, BLOCK_M] scale tensor held in registers


@triton.jit
def _stamp(trace_ptr, pid, k: tl.constexpr):
    """(trace experiment) globaltimer (ns) of this point into trace[pid, k]; slot 7: the SM."""
    t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [pid], dtype=tl.int64, is_pure=False, pack=1)
    tl.store(trace_ptr + pid * 8 + k, t)


@triton.jit
def _w4a4_kernel(
    x_desc, xs_ptr, xo_desc, xos_ptr,
    w_desc, wst_ptr, wo_desc, wos_ptr,
    bias_ptr, out_ptr, part_ptr, cnt_ptr,
    M, N, G, MN,
    s_xs, s_xos, s_out,
    HALF: tl.constexpr, NOUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
    NSPLIT: tl.constexpr, ITERS: tl.constexpr, K_TAIL: tl.constexpr, WS: tl.constexpr,
    X_UNPACKED: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, MAGIC: tl.constexpr,
    DOT_FP8: tl.constexpr, trace_ptr=None, TRACE: tl.constexpr = False,
):
    pid = tl.program_id(0)
    if TRACE:
        _stamp(trace_ptr, pid, 0)
        sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [pid], dtype=tl.int32, is_pure=False, pack=1)
        tl.store(trace_ptr + pid * 8 + 7, sm.to(tl.int64))
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_k = pid % NSPLIT
    t = pid // NSPLIT
    in_group = GROUP_M * num_pid_n
    first_m = (t // in_group) * GROUP_M
    gsz = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (t % in_group) % gsz
    pid_n = (t % in_group) // gsz

    n0 = pid_n * BLOCK_N
    m0 = pid_m * BLOCK_M
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    g0 = pid_k * ITERS

    sw_base = wst_ptr + offs_n
    sx_base = xs_ptr + offs_m * s_xs
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if pid_k < SPLIT_K:  # (with OUT_SPLIT, program SPLIT_K of a tile does the outliers alone)
        for i in tl.range(ITERS, warp_specialize=WS):
            d = _group_dot(w_desc, x_desc, n0, m0, g0 + i, HALF, X_UNPACKED, USE_ASM, DOT_FP8)
            sw, sx = _group_scales(sw_base, sx_base, g0 + i, G, N, n_mask, m_mask, K_TAIL, DOT_FP8)
            acc = _rescale(acc, d, sw, sx, MAGIC)
            if TRACE:
                if i == 0:
                    _stamp(trace_ptr, pid, 1)
    if TRACE:
        _stamp(trace_ptr, pid, 2)

    if NOUT > 0:
        if pid_k == NSPLIT - 1:
            wo = wo_desc.load([n0, 0])  # [BLOCK_N, NOUT]; columns past n_out read as zeros
            xo = xo_desc.load([m0, 0])  # [BLOCK_M, NOUT]
            do = tl.dot(wo, tl.trans(xo), out_dtype=tl.int32)
            swo = tl.load(wos_ptr + offs_n, mask=n_mask, other=0.0)
            sxo = tl.load(xos_ptr + offs_m * s_xos, mask=m_mask, other=0.0)
            acc = tl.fma(do.to(tl.float32), swo[:, None] * sxo[None, :], acc)
    if TRACE:
        _stamp(trace_ptr, pid, 3)

    out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * s_out + offs_n[:, None]
    out_mask = n_mask[:, None] & m_mask[None, :]
    if NSPLIT == 1:
        y = acc
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        p_off = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
        tl.store(part_ptr + pid_k * MN + p_off, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the arrival is published
        tile = pid_m * num_pid_n + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if TRACE:
            _stamp(trace_ptr, pid, 4)
            tl.store(trace_ptr + pid * 8 + 6, arrived.to(tl.int64))
        if arrived == NSPLIT - 1:  # the last program of this tile: reduce in split order
            y = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for s in tl.static_range(NSPLIT):
                y += tl.load(part_ptr + s * MN + p_off, mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)  # re-arm for the next launch
            if TRACE:
                _stamp(trace_ptr, pid, 5)


@triton.jit
def _unpack_act_kernel(xq_ptr, x8_ptr, M, G, s_xq, s_x8, HALF: tl.constexpr, BLOCK_R: tl.constexpr,
                       USE_ASM: tl.constexpr):
    """[M, G*HALF] packed int4 -> [M, G*2*HALF] int8 holding 16 * code, channels in natural order."""
    pid_r = tl.program_id(0)
    gi = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.arange(0, HALF)
    mask = (rows < M)[:, None]
    p = tl.load(xq_ptr + rows[:, None].to(tl.int64) * s_xq + gi * HALF + k[None, :], mask=mask, other=0)
    lo, hi = _unpack16(p, USE_ASM, False)
    dst = x8_ptr + rows[:, None].to(tl.int64) * s_x8 + gi * 2 * HALF + k[None, :]
    tl.store(dst, lo, mask=mask)
    tl.store(dst + HALF, hi, mask=mask)


# ----------------------------------------------------------------------------------------------- host side
def unpack_activations(xq: Tensor, group_size: int, out: Tensor | None = None) -> Tensor:
    """Packed int4 activations [M, Kn/2] -> int8 [M, Kn] holding 16 * code (the large-M operand)."""
    M, kh = xq.shape
    half = group_size // 2
    G = kh // half
    x8 = out if out is not None else torch.empty((M, 2 * kh), dtype=torch.int8, device=xq.device)
    block_r = 64
    _unpack_act_kernel[(triton.cdiv(M, block_r), G)](
        xq, x8, M, G, xq.stride(0), x8.stride(0), HALF=half, BLOCK_R=block_r,
        USE_ASM=not _interpreting(), num_warps=4)
    return x8


def _aligned(t: Tensor) -> Tensor:
    """Row-major with a 16-byte aligned base and row stride (what a TMA descriptor needs)."""
    if t.stride(1) != 1 or t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
        t = t.contiguous()
        if t.data_ptr() % 16:
            t = t.clone()
    return t


def _pad16(t: Tensor) -> Tensor:
    """Zero-pad the last dim to a multiple of 16 elements (int8: 16 bytes)."""
    k = t.shape[-1]
    return t if k % 16 == 0 else torch.nn.functional.pad(t, (0, 16 - k % 16))


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _split_for(M: int, N: int, G: int, bn: int, bm: int, waves: float, sms: int = 132) -> int:
    tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
    return max(1, min(G // 2, round(waves * sms / tiles)))


@functools.lru_cache(maxsize=4096)  # (called on every launch without a config: a pure function of its arguments)
def pick_config(M: int, N: int, G: int, sms: int = 132) -> Config:
    """Launch configuration by problem size without timing anything: the winners of the autotuner on the
    H100 (bench/results/gemm_h100.json, docs/notes_gemm.md), within 2% of the fastest candidate at every
    benchmarked size."""
    if _interpreting():
        return Config(block_n=32, block_m=16, split_k=2 if G >= 2 else 1, num_warps=4, num_stages=1)
    if M <= 32:  # memory-bound: split-K to about 4 programs per SM
        bm = max(16, _next_pow2(M))
        return Config(block_n=64, block_m=bm, split_k=_split_for(M, N, G, 64, bm, 4, sms), num_stages=4)
    if M <= 64:
        return Config(block_n=64, block_m=64, split_k=_split_for(M, N, G, 64, 64, 2, sms), num_stages=4)
    if M <= 256:
        if triton.cdiv(N, 64) * triton.cdiv(M, 128) < 1.5 * sms:  # few tiles: split-K to two waves
            return Config(block_n=64, block_m=128, split_k=_split_for(M, N, G, 64, 128, 2, sms), num_stages=4,
                          x_unpacked=True)
        return Config(block_n=64, block_m=64, num_stages=4, x_unpacked=True)
    return Config(block_n=64, block_m=128, num_stages=3, x_unpacked=True, group_m=16)


def candidates(M: int, N: int, G: int, sms: int = 132) -> list[Config]:
    """The configurations the autotuner times for a problem size (first entry: ``pick_config``'s)."""
    C = Config
    out = [pick_config(M, N, G, sms)]
    if M <= 64:
        bm = max(16, _next_pow2(M))
        for bn, waves, st in ((64, 2, 4), (64, 4, 5), (128, 2, 4), (128, 1, 5)):
            sk = _split_for(M, N, G, bn, bm, waves, sms)
            out.append(C(block_n=bn, block_m=bm, split_k=sk, num_stages=st))
            out.append(C(block_n=bn, block_m=bm, split_k=sk, num_stages=st, out_split=True))
        out.append(C(block_n=32, block_m=bm, split_k=1, num_stages=8))
        out.append(C(block_n=64, block_m=bm, split_k=_split_for(M, N, G, 64, bm, 8, sms), num_stages=3))
        out.append(C(block_n=16, block_m=bm, split_k=1, num_stages=8))
        for sub in (16, 32):  # narrower token tiles at M = 33..64: more programs, each weight tile read 2-4 times (L2)
            if sub < bm:
                for waves in (2, 4):
                    out.append(C(block_n=64, block_m=sub, split_k=_split_for(M, N, G, 64, sub, waves, sms), num_stages=4))
    elif M <= 256:
        for bn, bm, waves in ((128, 64, 1), (128, 64, 2), (64, 128, 2), (64, 64, 2)):
            out.append(C(block_n=bn, block_m=bm, split_k=_split_for(M, N, G, bn, bm, waves, sms), num_stages=4))
        for bn, bm, waves in ((64, 128, 1), (64, 128, 2), (64, 64, 1), (128, 64, 1)):
            out.append(C(block_n=bn, block_m=bm, split_k=_split_for(M, N, G, bn, bm, waves, sms), num_stages=4,
                         x_unpacked=True))
    else:
        # (Triton's Hopper warp specialization, Config.ws, compiled but hung or failed on the H100 at these
        # sizes; it is not a candidate.)
        out += [C(block_n=128, block_m=64, num_stages=4),
                C(block_n=64, block_m=128, num_stages=4, x_unpacked=True),
                C(block_n=64, block_m=128, num_stages=3, x_unpacked=True),
                C(block_n=128, block_m=64, num_stages=3, x_unpacked=True),
                C(block_n=64, block_m=128, num_stages=5, x_unpacked=True),
                C(block_n=64, block_m=128, num_stages=3, x_unpacked=True, group_m=16),
                C(block_n=64, block_m=64, num_stages=4, x_unpacked=True)]
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


# ----------------------------------------------------------------------------------------------- autotuning
_TUNED: dict = {}  # (device, M bucket, N, G, g, n_out) -> Config
AUTOTUNE_LOG: list = []  # one entry per tuned key: the candidates' median times


def _m_bucket(M: int) -> int:
    return min(max(16, _next_pow2(M)), 8192)


def set_autotune(enabled: bool) -> None:
    """Time the ``candidates`` on the first call of each problem size (M rounded up to a power of two)
    and keep the fastest, also in ``autotune_cache_path()`` (a later process on the same GPU model, Triton and
    CUDA reads it instead of timing); off by default unless ATOM_W4A4_AUTOTUNE=1. Never times during CUDA-graph
    capture (a stored choice is still used there)."""
    global _AUTOTUNE
    _AUTOTUNE = enabled


_AUTOTUNE = os.environ.get("ATOM_W4A4_AUTOTUNE", "0") == "1"
_LARGE_M_BACKEND = os.environ.get("ATOM_W4A4_LARGE_M", "cublas_fp8")


def set_large_m_backend(name: str) -> None:
    """Who runs ``w4a4_gemm`` from ``BLOCKSCALED_MIN_M`` tokens on (when no config is given): "cublas_fp8"
    (default: the weights unpacked to FP8 per call and cuBLAS's block-scaled FP8 GEMM, see
    ``fp8_blockscaled.py``; on Hopper with groups of 128) or "triton" (this file's kernel at every size).
    Also ATOM_W4A4_LARGE_M."""
    global _LARGE_M_BACKEND
    if name not in ("cublas_fp8", "triton"):
        raise ValueError(f"large-M backend must be 'cublas_fp8' or 'triton', got {name!r}")
    _LARGE_M_BACKEND = name


def takes_blockscaled_path(M: int, N: int, group_size: int, out_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``w4a4_gemm`` (without an explicit config) runs cuBLAS's block-scaled FP8 GEMM for this size."""
    return (M >= BLOCKSCALED_MIN_M and _LARGE_M_BACKEND == "cublas_fp8" and not _interpreting()
            and fp8_blockscaled.supported(device, group_size, N, out_dtype))


def _graph_time_us(fn, flush: Tensor, reps: int = 10) -> float:
    """Microseconds of one ``fn`` call with the L2 cleared before it: CUDA graphs of [clear, fn] x reps and of
    [clear] x reps, medians of 5 replays, difference / reps. (Per-call event timing of a 10 us kernel is
    dominated by launch jitter and ranked small-M configurations wrongly.)"""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        flush.zero_()
    torch.cuda.current_stream().wait_stream(stream)
    graphs = []
    for with_fn in (True, False):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                flush.zero_()
                if with_fn:
                    fn()
        graphs.append(g)
    med = []
    for g in graphs:
        g.replay()
        ts = []
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        med.append(sorted(ts)[2])
    return (med[0] - med[1]) * 1000 / reps


# ---------------------------------------------------------------------------------- tuned configurations on disk
def autotune_cache_path() -> Path:
    """Where the autotuner's choices persist: ``w4a4_autotune.json`` in the project's cache folder, next to
    converted checkpoints (``$ATOM_COMPILE_CACHE``, default ``~/.cache/atom-compile``)."""
    from atom_compile.models import cache_dir  # (imported when tuning: models pulls in transformers)

    return cache_dir() / "w4a4_autotune.json"


def device_key(device) -> str:
    """What a timing holds for: the GPU model and compute capability, and the Triton and CUDA versions."""
    p = torch.cuda.get_device_properties(device)
    return f"{p.name} | sm_{p.major}{p.minor} | triton {triton.__version__} | cuda {torch.version.cuda}"


_CONFIG_TYPES = {f.name: type(f.default) for f in dataclasses.fields(Config)}


def _config_from_json(d) -> Config | None:
    """A stored configuration, or None if it is not one this version's Config can take."""
    if not isinstance(d, dict) or set(d) - set(_CONFIG_TYPES):
        return None
    if any(type(v) is not _CONFIG_TYPES[k] for k, v in d.items()):  # (bool is not int here)
        return None
    return Config(**d)


def load_tuned(path: Path, dev_key: str) -> dict[str, Config]:
    """The configurations stored in ``path`` for ``dev_key``, by size key; {} if there is no file. A file that
    cannot be read or parsed is ignored with a warning (the autotuner then times again and rewrites it); an entry
    that is not a valid Config (another version's fields) is skipped."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring the W4A4 autotune cache {path} ({type(e).__name__}: {e}); it is rewritten after the "
                      "next tuning, or delete it", stacklevel=2)
        return {}
    entries = data.get(dev_key) if isinstance(data, dict) else None
    out = {}
    for size, d in (entries.items() if isinstance(entries, dict) else ()):
        cfg = _config_from_json(d)
        if cfg is not None:
            out[size] = cfg
    return out


def save_tuned(path: Path, dev_key: str, size: str, config: Config) -> None:
    """Merge one choice into ``path``: read, update, write a temporary file in the same folder, rename over (a
    reader never sees half a file; of two processes writing at once, one entry may be lost and timed again)."""
    try:
        data = json.loads(path.read_text())
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        data = {}
    entries = data.get(dev_key)
    entries = entries if isinstance(entries, dict) else {}
    entries[size] = dataclasses.asdict(config)
    data[dev_key] = entries
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    except OSError as e:  # a read-only home: the choice still holds for this process
        warnings.warn(f"could not write the W4A4 autotune cache {path}: {e}", stacklevel=2)


def _size_key(key: tuple) -> str:
    """(device index, M bucket, N, G, g, n_out, x_unpacked) -> "M,N,G,g,n_out,x_unpacked" (no device index)."""
    return ",".join(str(int(v)) for v in key[1:])


_DISK: dict = {}  # (cache path, device key) -> {size key: Config}, as loaded from the file


def tuned_config(key: tuple, dev_key: str, tune, may_time: bool) -> Config | None:
    """The tuned configuration for ``key``: this process's choice, else the disk cache's, else (``may_time``) a new
    timing by ``tune()``, kept in memory and on disk; None when there is none and timing is not allowed (during
    CUDA-graph capture)."""
    config = _TUNED.get(key)
    if config is not None:
        return config
    path = autotune_cache_path()
    disk = _DISK.get((path, dev_key))
    if disk is None:
        disk = _DISK[(path, dev_key)] = load_tuned(path, dev_key)
    config = disk.get(_size_key(key))
    if config is None:
        if not may_time:
            return None
        config = tune()
        disk[_size_key(key)] = config
        save_tuned(path, dev_key, _size_key(key), config)
    _TUNED[key] = config
    return config


def _autotune(args, key, M, N, G, x_unpacked: bool = False) -> Config:
    xq, xs, xo, xos, pw, bias, out = args
    flush = torch.empty(64 << 20, dtype=torch.int8, device=xq.device)  # larger than the 50 MB L2
    times, first = [], None
    cands = candidates(M, N, G)
    if x_unpacked:  # (activations given unpacked: every candidate reads them so)
        cands = list(dict.fromkeys(dataclasses.replace(c, x_unpacked=True) for c in cands))
    for cfg in cands:
        try:
            _launch(xq, xs, xo, xos, pw, bias, out, cfg, x_unpacked)
            y = out.float()
            if first is None:
                first = y
            elif not torch.isfinite(y).all() or (y - first).norm() > 1e-2 * first.norm():
                times.append((cfg, None, "output differs from the first candidate's"))
                continue
            us = _graph_time_us(lambda c=cfg: _launch(xq, xs, xo, xos, pw, bias, out, c, x_unpacked), flush)
        except Exception as e:  # noqa: BLE001  (a candidate that does not compile here is skipped)
            times.append((cfg, None, f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        times.append((cfg, us, None))
    ok = [(c, t) for c, t, _ in times if t is not None]
    best = min(ok, key=lambda ct: ct[1])[0] if ok else pick_config(M, N, G)
    AUTOTUNE_LOG.append(dict(key=key, M=M, N=N, G=G, best=best, times=times))
    return best


def w4a4_gemm(
    xq: Tensor,
    xs: Tensor,
    xo: Tensor,
    xos: Tensor,
    prepared: PreparedWeight,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: Config | None = None,
    out: Tensor | None = None,
    x_unpacked: bool = False,
) -> Tensor:
    """y [M, N] = W4A4 GEMM of the activation qtensor (xq, xs, xo, xos) with a prepared weight (+ bias).

    2-D inputs (the caller flattens leading dims). No host synchronization (CUDA-graph capturable).
    ``out``: optional preallocated [M, N] output of ``out_dtype``.
    ``x_unpacked``: xq is already int8 [M, G * g] holding 16 * code in natural channel order (what
    ``unpack_activations`` or a quantizer with ``x16=True`` writes); the kernel then loads it by TMA
    straight into the MMA whatever ``Config.x_unpacked`` says.
    """
    pw = prepared
    g = pw.group_size
    half = g // 2
    M = xq.shape[0]
    N, G, n_out = pw.N, pw.groups, pw.n_out
    e4m3 = xq.dtype == torch.float8_e4m3fn  # codes a quantizer wrote into the cuBLAS operand (x16="e4m3")
    width = G * g if x_unpacked or e4m3 else G * half
    if xq.dim() != 2 or xq.dtype not in (torch.int8, torch.float8_e4m3fn) or xq.shape[1] != width:
        raise ValueError(f"xq must be int8 [M, {width}] ({'unpacked' if x_unpacked else 'packed'}), "
                         f"got {xq.dtype} {tuple(xq.shape)}")
    if tuple(xs.shape) != (M, G):
        raise ValueError(f"xs must be [M, G] = [{M}, {G}], got {tuple(xs.shape)}")
    if tuple(xo.shape) != (M, n_out) or (n_out and xo.dtype != torch.int8):
        raise ValueError(f"xo must be int8 [M, {n_out}], got {xo.dtype} {tuple(xo.shape)}")
    if xos.numel() != M:
        raise ValueError(f"xos must have M = {M} elements, got {tuple(xos.shape)}")
    if bias is not None and bias.numel() != N:
        raise ValueError(f"bias must have N = {N} elements, got {tuple(bias.shape)}")
    if out is not None and (tuple(out.shape) != (M, N) or out.dtype != out_dtype or out.stride(1) != 1):
        raise ValueError("out must be a row-major [M, N] tensor of out_dtype")
    if M == 0:
        return out if out is not None else torch.empty((0, N), dtype=out_dtype, device=xq.device)
    if xs.dtype != torch.float32:
        xs = xs.float()
    xos = xos.reshape(M, 1)
    if xos.dtype != torch.float32:
        xos = xos.float()
    if config is None and takes_blockscaled_path(M, N, g, out_dtype, xq.device):
        # (cuBLAS writes its own output tensor: copied into ``out`` only when the caller gave one)
        return fp8_blockscaled.blockscaled_gemm(xq, xs, xo, xos, pw, bias, out_dtype, out, x_unpacked)
    if e4m3:
        raise ValueError("e4m3 activations (a quantizer's x16='e4m3') are for the cuBLAS large-M path only: "
                         f"M = {M}, N = {N}, group {g}, {out_dtype}, config {config} do not take it")
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype, device=xq.device)
    if config is None:
        key = (xq.device.index, _m_bucket(M), N, G, g, n_out, x_unpacked)
        config = _TUNED.get(key)
        if config is None and _AUTOTUNE and not _interpreting():
            config = tuned_config(key, device_key(xq.device),
                                  lambda: _autotune((xq, xs, xo, xos, pw, bias, out), key, M, N, G, x_unpacked),
                                  may_time=not torch.cuda.is_current_stream_capturing())
        if config is None:
            config = pick_config(M, N, G)
    _launch(xq, xs, xo, xos, pw, bias, out, config, x_given_unpacked=x_unpacked)
    return out


def _use_ws(cfg: Config, nsplit: int, interp: bool, x_unpacked: bool) -> bool:
    """Triton 3.6's Hopper warp specialization splits the tile's rows over two consumer warpgroups only
    for block_n >= 128 (at 64 both consumers computed the whole tile) and fails to compile the in-kernel
    activation unpacking: use it only where it was seen to work."""
    return cfg.ws and not interp and x_unpacked and cfg.block_n >= 128 and nsplit == 1


def _launch(xq, xs, xo, xos, pw: PreparedWeight, bias, out, cfg: Config, x_given_unpacked: bool = False,
            trace=None) -> None:
    M, N, G, n_out = xq.shape[0], pw.N, pw.groups, pw.n_out
    g = pw.group_size
    half = g // 2
    interp = _interpreting()
    if cfg.dot_fp8 and interp:
        raise ValueError("dot_fp8 configurations run on the GPU only")
    tiles = triton.cdiv(N, cfg.block_n) * triton.cdiv(M, cfg.block_m)
    split = max(1, min(cfg.split_k, G)) if tiles <= pw.counters.numel() else 1
    iters = triton.cdiv(G, split)
    split = triton.cdiv(G, iters)  # no split left without groups
    nsplit = split + (1 if (cfg.out_split and split > 1 and n_out) else 0)
    if nsplit > 1:
        part = torch.empty((nsplit, M, N), dtype=torch.float32, device=xq.device)
    else:
        part = out  # unused
    x_unpacked = cfg.x_unpacked or x_given_unpacked  # the kernel reads int8 16 * code (given, or unpacked here)
    x_in = unpack_activations(xq, g) if cfg.x_unpacked and not x_given_unpacked else _aligned(xq)
    x_desc = TensorDescriptor.from_tensor(x_in, [cfg.block_m, half])
    w_desc = pw.descriptor(cfg.block_n)
    nout_p = max(32, _next_pow2(n_out)) if n_out else 0
    if n_out:
        wo_desc = pw.outlier_descriptor(cfg.block_n, nout_p)
        xo_desc = TensorDescriptor.from_tensor(_aligned(_pad16(xo)), [cfg.block_m, nout_p])
    else:
        wo_desc = xo_desc = w_desc  # unused
    grid = (tiles * nsplit,)
    _w4a4_kernel[grid](
        x_desc, xs, xo_desc, xos,
        w_desc, pw.ws_t, wo_desc, pw.wos,
        bias if bias is not None else out, out, part, pw.counters,
        M, N, G, M * N,
        xs.stride(0), xos.stride(0), out.stride(0),
        HALF=half, NOUT=nout_p,
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, SPLIT_K=split, GROUP_M=cfg.group_m,
        NSPLIT=nsplit, ITERS=iters, K_TAIL=split * iters != G, WS=_use_ws(cfg, nsplit, interp, x_unpacked),
        X_UNPACKED=x_unpacked, HAS_BIAS=bias is not None, USE_ASM=not interp, MAGIC=cfg.magic,
        DOT_FP8=cfg.dot_fp8, trace_ptr=trace, TRACE=trace is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
