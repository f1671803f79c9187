"""An independent fake-quant reference, written from the formulas in DESIGN.md, not from atom_compile.quant.

Symmetric integer formats: scale = (absmax * clip) / qmax per group (float32), q = clamp(round(x / scale)),
value = q * scale. INT8 outliers: one scale per row over all outlier channels, no clipping.
KV: asymmetric per (token, head), scale rounded to float16 as the cache stores it.
"""

from __future__ import annotations

import torch

FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _int_range(fmt: str) -> tuple[int, int]:
    bits = int(fmt.removeprefix("int"))
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def fake_quant_groups(x: torch.Tensor, fmt: str, group: int, clip: float, rows_per_scale: int = 1) -> torch.Tensor:
    """Quantize-dequantize the last dim of x in groups (float32 maths; float64 stays float64)."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = x.shape
    xg = x.to(dt).reshape(*shape[:-1], shape[-1] // group, group)
    absmax = xg.abs().amax(-1)
    if rows_per_scale > 1:  # weights: rows_per_scale consecutive rows share a scale
        r = absmax.shape[-2]
        absmax = absmax.reshape(r // rows_per_scale, rows_per_scale, -1).amax(1).repeat_interleave(rows_per_scale, 0)
    if fmt == "fp4":
        scale = ((absmax * clip) / 12).float().to(dt)  # 12 half-units = 6.0
        v = xg / torch.where(scale > 0, scale, 1).unsqueeze(-1) / 2  # in FP4 value units
        grid = FP4_GRID.to(dt)
        dist = (v.abs().clamp(max=6).unsqueeze(-1) - grid).abs()
        best = dist.argmin(-1)  # ties: lower index; fix ties towards the even index
        tie = (dist.gather(-1, (best + 1).clamp(max=7).unsqueeze(-1)).squeeze(-1) == dist.gather(-1, best.unsqueeze(-1)).squeeze(-1)) & (best % 2 == 1) & (best < 7)
        best = torch.where(tie, best + 1, best)
        q = grid[best] * torch.sign(v) * 2
        return (q * scale.unsqueeze(-1)).reshape(shape).to(x.dtype)
    qmin, qmax = _int_range(fmt)
    scale = ((absmax * clip) / qmax).float().to(dt)
    q = torch.clamp(torch.round(xg / torch.where(scale > 0, scale, 1).unsqueeze(-1)), qmin, qmax)
    return (q * scale.unsqueeze(-1)).reshape(shape).to(x.dtype)


def fake_quant_rows(x: torch.Tensor, spec, side: str) -> torch.Tensor:
    """Atom's quantization of a linear's input (side="act") or weight (side="weight"), outliers last."""
    fmt = spec.act_format if side == "act" else spec.weight_format
    clip = spec.act_clip if side == "act" else spec.weight_clip
    r = spec.weight_channel_group if side == "weight" else 1
    n = spec.n_outliers
    normal = fake_quant_groups(x[..., : x.shape[-1] - n], fmt, spec.group_size, clip, r)
    outl = x[..., x.shape[-1] - n :]
    if n and spec.outlier_format == "int8":
        outl = fake_quant_groups(outl, "int8", n, 1.0, r)
    return torch.cat([normal, outl], dim=-1)


def fake_quant_kv(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    """Asymmetric per-row (last dim) quantize-dequantize with a float16-rounded scale."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(dt)
    qmax = 2**bits - 1
    hi = xf.amax(-1, keepdim=True) * clip
    lo = xf.amin(-1, keepdim=True) * clip
    scale = ((hi - lo) / qmax).half().to(dt)
    scale = torch.where(scale > 0, scale, 1)
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    q = torch.clamp(torch.round(xf / scale) + zero, 0, qmax)
    return ((q - zero) * scale).to(x.dtype)
