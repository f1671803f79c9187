"""Triton kernel for ``atom.hadamard_heads``: every head of q / k (after RoPE) times the orthonormal Hadamard
matrix of order D, on tensor cores.

Same arguments and result as ``ops.hadamard_heads_reference``. The reference multiplies in fp32 by
H / sqrt(D). Here the +-1 matrix goes into the tensor-core dot in the input's dtype (exact in bf16 /
fp16, and fp32 inputs use an fp32 FMA dot), the products of a 16-bit input by +-1 are exact and the
sum is accumulated in fp32. Then 1 / sqrt(D) is applied in fp32 and the result is cast to the input's
dtype. For D = 64 (and any power of 4) the scale is a power of two and the result equals the
reference's up to the order of the fp32 sum; for D = 128 the scale is rounded once more. Bound (tested):
relative error below 2^-20 before the cast, so at most one unit in the last place of a bf16 / fp16
output differs, and rarely (measured in the tests).

Rows are (token, head) pairs: x [..., heads * D] is viewed as [R, D]; one program rotates BLOCK_R rows.
The reference's fp32 SIMT GEMM with a cast on each side was 119 us per call at a 4096-token Llama-7B
prefill (bench/results/layer_h100_rotation_torch_hadamard.json); this kernel, 25 us
(bench/results/layer_h100.json), reads and writes each element once.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from atom_compile.ops import hadamard_matrix

from .quantize import _TL_DTYPES, _interpreting, _round_to


@triton.jit
def _hadamard_kernel(x_ptr, h_ptr, y_ptr, R, scale, D: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
                     OUT: tl.constexpr, NATIVE: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, D)
    mask = (rows < R)[:, None]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    h = tl.load(h_ptr + cols[:, None] * D + cols[None, :])
    if IEEE:  # fp32 inputs, and under the interpreter (whose 16-bit dots and casts are not the GPU's)
        acc = tl.dot(x.to(tl.float32), h.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(x, h)
    y = _round_to(acc * scale, OUT, NATIVE)  # (the interpreter's own fp32 -> bf16 cast truncates)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=32)
def _plus_minus_one(D: int, dtype: torch.dtype, device) -> Tensor:
    """The +-1 Hadamard matrix of order D, built once per (D, dtype, device): none is built inside a CUDA graph."""
    return (hadamard_matrix(D, torch.float64, device) * D**0.5).round().to(dtype).contiguous()


def hadamard_heads(x: Tensor, head_dim: int, *, block_rows: int = 64, num_warps: int = 4) -> Tensor:
    """x [..., heads * head_dim] with each head rotated by the orthonormal Hadamard matrix of order head_dim."""
    D = head_dim
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise NotImplementedError(f"triton hadamard_heads: dtype {x.dtype}")
    if D < 16 or D & (D - 1) or x.shape[-1] % D:
        raise NotImplementedError(f"triton hadamard_heads: head_dim {D} (a power of two >= 16 dividing the last dim)")
    x2 = x.contiguous().view(-1, D)
    R = x2.shape[0]
    y = torch.empty_like(x2)
    if R:
        h = _plus_minus_one(D, x.dtype, x.device)
        _hadamard_kernel[(triton.cdiv(R, block_rows),)](
            x2, h, y, R, float(1.0 / D**0.5), D=D, BLOCK_R=block_rows, IEEE=x.dtype == torch.float32 or _interpreting(),
            OUT=_TL_DTYPES[x.dtype], NATIVE=not _interpreting(), num_warps=num_warps,
        )
    return y.view(x.shape)
