"""Triton kernel for ``atom.rope``: rotary embedding (rotate-half convention) of every head of a token row.

Same arguments and result as ``ops.rope_reference``: x [B, T, H * D], cos / sin [B, T, D] (any strides,
e.g. expanded over the batch), result in promote(x.dtype, cos.dtype). Bit-exact: each product and the sum
are rounded to the result dtype, as torch's elementwise ops round x * cos, rotate_half(x) * sin and their
sum. One program per token row: the row's heads share its cos / sin, read once; x is read and the result
written once. The reference's five torch ops (two products, a negation, a concatenation, a sum) each make
a pass over the tensor: ~450 us per Llama-7B prefill layer of 4,096 tokens
(bench/results/layer_h100_torch_rope.json); this kernel, 48 us (bench/results/layer_h100.json).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .quantize import _TL_DTYPES, _interpreting, _round_to


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, T,
                 stride_xb, stride_xt, stride_cb, stride_ct, stride_sb, stride_st, stride_yb, stride_yt,
                 H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, OUT: tl.constexpr, NATIVE: tl.constexpr):
    row = tl.program_id(0)
    b = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    HALF: tl.constexpr = D // 2
    hh = tl.arange(0, H_PAD)
    jj = tl.arange(0, HALF)
    mask = (hh < H)[:, None] & (jj[None, :] < HALF)
    x_row = x_ptr + b * stride_xb + t * stride_xt
    lo = hh[:, None] * D + jj[None, :]
    x1 = tl.load(x_row + lo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + lo + HALF, mask=mask, other=0.0).to(tl.float32)
    c_row = cos_ptr + b * stride_cb + t * stride_ct
    s_row = sin_ptr + b * stride_sb + t * stride_st
    c1 = tl.load(c_row + jj).to(tl.float32)[None, :]
    c2 = tl.load(c_row + HALF + jj).to(tl.float32)[None, :]
    s1 = tl.load(s_row + jj).to(tl.float32)[None, :]
    s2 = tl.load(s_row + HALF + jj).to(tl.float32)[None, :]
    y1 = _round_to(_round_to(x1 * c1, OUT, NATIVE) + _round_to(-x2 * s1, OUT, NATIVE), OUT, NATIVE)
    y2 = _round_to(_round_to(x2 * c2, OUT, NATIVE) + _round_to(x1 * s2, OUT, NATIVE), OUT, NATIVE)
    y_row = y_ptr + b * stride_yb + t * stride_yt
    tl.store(y_row + lo, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_row + lo + HALF, y2.to(y_ptr.dtype.element_ty), mask=mask)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of flat heads: x [B, T, H * D], cos / sin [B, T, D]. Same contract as ``ops.rope_reference``."""
    B, T, HD = x.shape
    D = cos.shape[-1]
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    if out_dtype not in _TL_DTYPES or x.dtype not in _TL_DTYPES or cos.dtype not in _TL_DTYPES:
        raise NotImplementedError(f"triton rope: dtypes {x.dtype} / {cos.dtype}")
    if D < 2 or D & (D - 1) or HD % D or cos.shape[:2] != (B, T) or sin.shape != cos.shape:
        raise NotImplementedError(f"triton rope: x {tuple(x.shape)}, cos {tuple(cos.shape)}")
    if x.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise NotImplementedError("triton rope: the last dimension must be contiguous")
    y = torch.empty(B, T, HD, dtype=out_dtype, device=x.device)
    if B * T:
        H = HD // D
        _rope_kernel[(B * T,)](
            x, cos, sin, y, T, x.stride(0), x.stride(1), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
            y.stride(0), y.stride(1), H=H, H_PAD=triton.next_power_of_2(H), D=D, OUT=_TL_DTYPES[out_dtype],
            NATIVE=not _interpreting(), num_warps=4, enable_fp_fusion=False,
        )
    return y
