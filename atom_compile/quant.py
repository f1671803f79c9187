"""Quantization primitives in plain PyTorch, with exact integer semantics.

These functions are the numerical definition of the project: the custom ops in ``ops.py`` call them,
the GPU kernels are tested against them, and the fake-quant reference in the tests re-derives them.

Row-quantized tensor ("qtensor") layout, for activations (a row is a token) and weights (a row is an
output channel). The K input channels are already reordered so that the ``n_outliers`` outlier
channels are the last ones:

- ``q``:  the K - n normal channels as integer codes. 4-bit and narrower codes are packed two per
  byte: within each group of g channels, byte j holds channel j in its low nibble and channel
  j + g/2 in its high nibble (``pack_nibbles``). Wider codes are one int8 per channel.
- ``scales``: float32 [rows, K_normal / g] (weights: [rows / weight_channel_group, groups]).
- ``outliers``: the n outlier channels, int8 codes (format "int8") or floating point ("fp16").
- ``outlier_scales``: float32 [rows, 1] (ones for "fp16" outliers).

Rounding is round-half-to-even everywhere (``torch.round``); scales are computed as
``(absmax * clip) / qmax`` in float32 and values as ``round(x / scale)``, in that order, so a kernel can
reproduce the codes bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

# FP4 e2m1: codes 0..7 are +{0, .5, 1, 1.5, 2, 3, 4, 6}, codes 8..15 the same values negated.
# Integer "units" are half-steps, so every FP4 value is an exact integer in [-12, 12].
FP4_UNITS = (0, 1, 2, 3, 4, 6, 8, 12)
FP4_QMAX = 12


def is_packed(fmt: str) -> bool:
    """Formats stored two codes per byte."""
    return fmt == "fp4" or (fmt.startswith("int") and int(fmt[3:]) <= 4)


def int_range(fmt: str) -> tuple[int, int]:
    """(qmin, qmax) of a format, in integer units."""
    if fmt == "fp4":
        return -FP4_QMAX, FP4_QMAX
    bits = int(fmt[3:])
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64 (used by the float64 equivalence tests); everything else computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fp4_table(device) -> Tensor:
    units = torch.tensor(FP4_UNITS, dtype=torch.int32, device=device)
    return torch.cat([units, -units])  # index = e2m1 code


def round_to_grid(v: Tensor, fmt: str) -> Tensor:
    """Round values already divided by the scale to the format's grid; returns int8 integer units."""
    qmin, qmax = int_range(fmt)
    if fmt == "fp4":
        # Nearest FP4 value in half-units; a tie goes to the even code (zero mantissa bit).
        mag = v.abs().clamp(max=FP4_QMAX)
        grid = torch.tensor(FP4_UNITS, dtype=v.dtype, device=v.device)
        lo = (torch.bucketize(mag, grid, right=True) - 1).clamp(0, 7)
        hi = (lo + 1).clamp(max=7)
        d_lo = mag - grid[lo]
        d_hi = grid[hi] - mag
        take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
        units = grid[torch.where(take_hi, hi, lo)]
        return torch.where(v < 0, -units, units).to(torch.int8)
    return torch.round(v).clamp(qmin, qmax).to(torch.int8)


def fp4_encode(units: Tensor) -> Tensor:
    """Integer half-units in [-12, 12] (values of the FP4 grid) to e2m1 codes 0..15 (int8)."""
    lut = torch.full((25,), -1, dtype=torch.int8, device=units.device)
    for code, u in enumerate(FP4_UNITS):
        lut[u + 12] = code
        if u:
            lut[-u + 12] = code + 8
    codes = lut[units.long() + 12]
    if (codes < 0).any():
        raise ValueError("fp4_encode: value not on the FP4 grid")
    return codes


def fp4_decode(codes: Tensor) -> Tensor:
    """e2m1 codes 0..15 to integer half-units (int32)."""
    return _fp4_table(codes.device)[codes.long() & 15]


def pack_nibbles(codes: Tensor, group_size: int) -> Tensor:
    """[..., K] codes in [-8, 7] (or e2m1 codes) -> [..., K/2] int8, half-split within each group.

    Byte j of group G holds element G*g + j in bits 0-3 and element G*g + j + g/2 in bits 4-7.
    """
    *lead, K = codes.shape
    g = group_size
    c = codes.to(torch.int16).reshape(*lead, K // g, 2, g // 2)
    byte = (c[..., 0, :] & 0xF) | ((c[..., 1, :] & 0xF) << 4)
    return byte.to(torch.uint8).view(torch.int8).reshape(*lead, K // 2)


def unpack_nibbles(packed: Tensor, group_size: int, signed: bool = True) -> Tensor:
    """Inverse of ``pack_nibbles``: [..., K/2] int8 -> [..., K] int32 (sign-extended if ``signed``)."""
    *lead, Kh = packed.shape
    g = group_size
    p = packed.view(torch.uint8).reshape(*lead, Kh // (g // 2), 1, g // 2)
    nibbles = torch.cat([p & 0xF, p >> 4], dim=-2).reshape(*lead, Kh * 2)  # uint8 0..15, one pass
    if signed:
        nibbles = (nibbles ^ 8).view(torch.int8) - 8  # two's complement of the 4-bit code
    return nibbles.to(torch.int32)


def decode_codes(q: Tensor, fmt: str, group_size: int) -> Tensor:
    """Stored codes of the normal channels to integer units (int32), undoing any packing."""
    if fmt == "fp4":
        return fp4_decode(unpack_nibbles(q, group_size, signed=False))
    if is_packed(fmt):
        return unpack_nibbles(q, group_size)
    return q.to(torch.int32)


def encode_codes(units: Tensor, fmt: str, group_size: int) -> Tensor:
    """Integer units to stored codes (packed for 4-bit and narrower formats)."""
    if fmt == "fp4":
        return pack_nibbles(fp4_encode(units), group_size)
    if is_packed(fmt):
        return pack_nibbles(units, group_size)
    return units.to(torch.int8)


def group_scales(x: Tensor, fmt: str, group_size: int, clip: float, rows_per_scale: int = 1) -> Tensor:
    """float32 [rows / rows_per_scale, K / g]: (absmax * clip) / qmax over each group."""
    *lead, K = x.shape
    _, qmax = int_range(fmt)
    a = x.to(compute_dtype(x)).abs().reshape(*lead, K // group_size, group_size).amax(-1)
    if rows_per_scale > 1:
        rows = a.shape[-2]
        a = a.reshape(*a.shape[:-2], rows // rows_per_scale, rows_per_scale, a.shape[-1]).amax(-2)
    return ((a * clip) / qmax).to(torch.float32)


CLIP_GRID = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0, 0.975, ..., 0.5


def mse_group_scales(x: Tensor, fmt: str, group_size: int, rows_per_scale: int = 1) -> Tensor:
    """Scales whose clip ratio, chosen per group from CLIP_GRID, minimizes the group's squared error.

    Same layout as ``group_scales``; rows sharing a scale (``rows_per_scale``) choose together.
    """
    best_err, best = None, None
    for clip in CLIP_GRID:
        s = group_scales(x, fmt, group_size, clip, rows_per_scale)
        deq = dequantize_groups(quantize_with_scales(x, s, fmt, group_size, rows_per_scale), s, group_size, rows_per_scale)
        err = (deq - x.float()).pow(2).reshape(*x.shape[:-1], -1, group_size).sum(-1)  # [rows, groups]
        if rows_per_scale > 1:
            err = err.reshape(-1, rows_per_scale, err.shape[-1]).sum(1)
        if best is None:
            best_err, best = err, s
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, s, best)
    return best


def dequantize_groups(units: Tensor, scales: Tensor, group_size: int, rows_per_scale: int = 1,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """Integer units [..., K] times their group's scale, computed in ``dtype``."""
    s = scales if rows_per_scale == 1 else scales.repeat_interleave(rows_per_scale, dim=-2)
    *lead, K = units.shape
    return (units.to(dtype).reshape(*lead, K // group_size, group_size) * s.to(dtype).unsqueeze(-1)).reshape(*lead, K)


def quantize_with_scales(x: Tensor, scales: Tensor, fmt: str, group_size: int, rows_per_scale: int = 1) -> Tensor:
    """round(x / scale) onto the format's grid, per group; returns int8 integer units [..., K]."""
    *lead, K = x.shape
    s = scales
    if rows_per_scale > 1:
        s = s.repeat_interleave(rows_per_scale, dim=-2)
    s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero group quantizes to zeros
    v = x.to(compute_dtype(x)).reshape(*lead, K // group_size, group_size) / s.unsqueeze(-1)
    return round_to_grid(v, fmt).reshape(*lead, K)


def quantize_rows(
    x: Tensor,
    fmt: str,
    group_size: int,
    n_outliers: int,
    outlier_format: str,
    clip: float,
    rows_per_scale: int = 1,
    clip_search: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Quantize the last dim of ``x`` (already reordered, outliers last) into the qtensor layout.

    ``clip_search``: choose each group's clip ratio for the least squared error (weights) instead of ``clip``.
    """
    K = x.shape[-1]
    n_normal = K - n_outliers
    normal = x[..., :n_normal]
    if clip_search:
        scales = mse_group_scales(normal, fmt, group_size, rows_per_scale)
    else:
        scales = group_scales(normal, fmt, group_size, clip, rows_per_scale)
    units = quantize_with_scales(normal, scales, fmt, group_size, rows_per_scale)
    q = encode_codes(units, fmt, group_size)
    outliers, outlier_scales = quantize_outliers(x[..., n_normal:], outlier_format, rows_per_scale)
    return q, scales, outliers, outlier_scales


def quantize_outliers(x: Tensor, outlier_format: str, rows_per_scale: int = 1) -> tuple[Tensor, Tensor]:
    """Outlier channels: INT8 symmetric over all of them per row (no clipping), or kept in float."""
    n = x.shape[-1]
    if outlier_format == "fp16" or n == 0:
        ones = torch.ones(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
        if rows_per_scale > 1:
            ones = ones[..., ::rows_per_scale, :]
        return (x.clone() if outlier_format == "fp16" else x.to(torch.int8)), ones
    scales = group_scales(x, "int8", n, 1.0, rows_per_scale)
    return quantize_with_scales(x, scales, "int8", n, rows_per_scale), scales


def dequantize_rows(
    q: Tensor,
    scales: Tensor,
    outliers: Tensor,
    outlier_scales: Tensor,
    fmt: str,
    group_size: int,
    outlier_format: str,
    rows_per_scale: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """qtensor -> [..., K] (normal channels, then outliers), the fake-quant values.

    Computed in float32 (float64 when ``dtype`` is float64) and returned in ``dtype``.
    """
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    normal = dequantize_groups(decode_codes(q, fmt, group_size), scales, group_size, rows_per_scale, cdt)
    os_ = outlier_scales if rows_per_scale == 1 else outlier_scales.repeat_interleave(rows_per_scale, dim=-2)
    out = outliers.to(cdt) if outlier_format == "fp16" else outliers.to(cdt) * os_.to(cdt)
    return torch.cat([normal, out], dim=-1).to(dtype)


def exact_matmul_dtype(k: int, amax: int, bmax: int) -> torch.dtype:
    """Smallest float dtype whose matmul of integer operands over ``k`` terms is exact.

    Every partial sum of an integer dot product with |a| <= amax, |b| <= bmax over k terms is an
    integer of magnitude at most k * amax * bmax; float32 represents every integer up to 2^24 exactly
    and float64 every integer up to 2^53, so the float matmul equals int32 accumulation.
    """
    bound = k * amax * bmax
    if bound < 2**24:
        return torch.float32
    if bound < 2**53:
        return torch.float64
    raise ValueError(f"integer dot product of {k} terms may overflow: bound {bound}")


def integer_matmul(a: Tensor, b: Tensor, amax: int, bmax: int) -> Tensor:
    """Exact a @ b.T for integer-valued tensors (int32 accumulation semantics), as float32 or float64."""
    dt = exact_matmul_dtype(a.shape[-1], amax, bmax)
    return a.to(dt) @ b.to(dt).transpose(-1, -2)


# --------------------------------------------------------------------------- KV cache (asymmetric)
def kv_quantize(x: Tensor, bits: int, clip: float) -> tuple[Tensor, Tensor]:
    """Asymmetric quantization over the last dim (one group per token and head).

    Returns (codes uint8 [..., D] in [0, 2^bits - 1], params float16 [..., 2] = (scale, zero)).
    The scale is rounded to float16 before it is used, so the stored params reproduce the codes.
    """
    qmax = 2**bits - 1
    xf = x.to(compute_dtype(x))
    xmax = xf.amax(-1) * clip
    xmin = xf.amin(-1) * clip
    scale = ((xmax - xmin) / qmax).to(torch.float16).to(xf.dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-xmin / scale).clamp(0, qmax)
    codes = (torch.round(xf / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, qmax)
    params = torch.stack([scale, zero], dim=-1).to(torch.float16)
    return codes.to(torch.uint8), params


def kv_dequantize(codes: Tensor, params: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(codes - zero) * scale, in float32 (float64 if asked)."""
    p = params.to(dtype)
    return (codes.to(dtype) - p[..., 1:2]) * p[..., 0:1]


def kv_pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [..., D] -> [..., D * bits / 8]; 2- and 4-bit codes are split by quarters / halves.

    4 bits: byte j holds element j (bits 0-3) and element j + D/2 (bits 4-7).
    2 bits: byte j holds elements j, j + D/4, j + D/2, j + 3D/4 in bits 0-1, 2-3, 4-5, 6-7.
    """
    if bits == 8:
        return codes
    per_byte = 8 // bits
    *lead, D = codes.shape
    c = codes.to(torch.int32).reshape(*lead, per_byte, D // per_byte)
    out = torch.zeros(*lead, D // per_byte, dtype=torch.int32, device=codes.device)
    for i in range(per_byte):
        out |= c[..., i, :] << (bits * i)
    return out.to(torch.uint8)


def kv_unpack(packed: Tensor, bits: int) -> Tensor:
    """Inverse of ``kv_pack``."""
    if bits == 8:
        return packed
    per_byte = 8 // bits
    p = packed.to(torch.int32)
    parts = [(p >> (bits * i)) & (2**bits - 1) for i in range(per_byte)]
    return torch.cat(parts, dim=-1).to(torch.uint8)
