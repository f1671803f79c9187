"""The ``atom`` custom ops: the vocabulary of the graphs, each with its reference implementation.

Every op is a real ``torch.library`` custom op (``torch.ops.atom.<name>``) with a reference
implementation in plain PyTorch (any device; exact integer semantics, see ``quant.py``) and a fake
implementation for shape propagation. The GPU kernels in ``runtime_kernels`` implement the same
contracts and are tested against these functions.

Shapes: activations are [B, T, C] (or [M, C]); attention projections are flat, [B, T, heads * D];
KV caches are [B, H_kv, S_max, D'] with D' = D for a float cache and D * bits / 8 for a quantized one.
Quantized activations and weights use the qtensor layout of ``quant.py``: (q, scales, outliers,
outlier_scales).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from atom_compile import quant

QTensor = tuple[Tensor, Tensor, Tensor, Tensor]


# ============================================================================ float building blocks
def rms_norm_reference(x: Tensor, weight: Tensor, eps: float, perm: Tensor | None = None) -> Tensor:
    """RMSNorm as Llama computes it (float32 statistics), its output channels gathered by ``perm``.

    ``weight`` is already given in the gathered order: out[..., i] = norm(x)[..., perm[i]] * weight[i].
    """
    return _rms_norm(x, weight, eps, perm)


def _rms_norm(x: Tensor, weight: Tensor, eps: float, perm: Tensor | None) -> Tensor:
    xf = x.to(quant.compute_dtype(x))  # float32 statistics (as HF Llama), float64 stays float64
    variance = xf.pow(2).mean(-1, keepdim=True)
    normed = (xf * torch.rsqrt(variance + eps)).to(x.dtype)
    if perm is not None:
        normed = normed.index_select(-1, perm)
    return weight * normed


def _rms_norm_fake(x, weight, eps, perm=None):
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding (rotate-half convention) of flat heads: x [B, T, H * D], cos/sin [B, T, D]."""
    B, T, HD = x.shape
    D = cos.shape[-1]
    xh = x.view(B, T, HD // D, D)
    c = cos.unsqueeze(2)
    s = sin.unsqueeze(2)
    x1, x2 = xh[..., : D // 2], xh[..., D // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    return ((xh * c) + (rotated * s)).reshape(B, T, HD)


def _rope_fake(x, cos, sin):
    return torch.empty_like(x)


@functools.lru_cache(maxsize=32)
def hadamard_matrix(n: int, dtype=torch.float32, device=None) -> Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order n (a power of two); symmetric, its own inverse.

    Cached per (n, dtype, device): built once, so that no host-to-device copy happens inside a CUDA graph."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype=dtype, device=device)


def hadamard_heads_reference(x: Tensor, head_dim: int) -> Tensor:
    """Rotate each head of x [..., heads * D] by the orthonormal Hadamard matrix of order D."""
    cdt = quant.compute_dtype(x)
    h = hadamard_matrix(head_dim, cdt, x.device)  # cached: never modified
    xs = x.to(cdt).unflatten(-1, (-1, head_dim))
    return (xs @ h).flatten(-2).to(x.dtype)


def _hadamard_heads_fake(x, head_dim):
    return torch.empty_like(x)


# ============================================================================ KV cache: float
def _positions(cache_seqlens: Tensor, T: int, S: int) -> Tensor:
    """Cache slots [B, T] written by T new tokens of each sequence; checks they fit in S slots."""
    pos = cache_seqlens.long().unsqueeze(1) + torch.arange(T, device=cache_seqlens.device)
    if T and int(pos.max()) >= S:
        raise ValueError(
            f"KV cache overflow: writing up to position {int(pos.max())} into a cache of {S} slots; "
            "allocate a longer cache (max_seq_len)"
        )
    return pos


def _store(cache: Tensor, new: Tensor, pos: Tensor) -> None:
    """cache [B, H, S, X] <- new [B, T, H, X] at slots pos [B, T]."""
    B, T, H, X = new.shape
    idx = pos.view(B, 1, T, 1).expand(B, H, T, X)
    cache.scatter_(2, idx, new.transpose(1, 2).to(cache.dtype))


def kv_cache_store_reference(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor) -> Tensor:
    """Write k, v [B, T, H_kv * D] into the float caches after ``cache_seqlens``; returns the new lengths."""
    B, T, _ = k.shape
    _, H, S, D = k_cache.shape
    pos = _positions(cache_seqlens, T, S)
    _store(k_cache, k.view(B, T, H, D), pos)
    _store(v_cache, v.view(B, T, H, D), pos)
    return (cache_seqlens + T).to(torch.int32)


def _kv_cache_store_fake(k, v, k_cache, v_cache, cache_seqlens):
    return torch.empty_like(cache_seqlens, dtype=torch.int32)


def attend(q: Tensor, k: Tensor, v: Tensor, kv_lens: Tensor) -> Tensor:
    """Causal attention of the last T positions over float K/V [B, H_kv, S, D]; softmax in float32.

    Query t of sequence b sits at position kv_lens[b] - T + t and sees the cache slots up to it.
    Grouped-query attention: query head h reads KV head h // (H_q / H_kv). Computed by torch's
    SDPA on float32 (float64 for float64 inputs) with an explicit boolean mask.
    """
    B, T, HD = q.shape
    _, Hkv, S, D = k.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    S_used = int(kv_lens.max()) if B else 0
    kf = k[:, :, :S_used].to(compute)
    vf = v[:, :, :S_used].to(compute)
    qf = q.to(compute).view(B, T, HD // D, D).transpose(1, 2)  # [B, Hq, T, D]
    qpos = kv_lens.long().view(B, 1) - T + torch.arange(T, device=q.device)  # [B, T]
    allowed = torch.arange(S_used, device=q.device).view(1, 1, S_used) <= qpos.unsqueeze(-1)
    out = torch.nn.functional.scaled_dot_product_attention(
        qf, kf, vf, attn_mask=allowed.unsqueeze(1), enable_gqa=Hkv != HD // D
    )
    return out.transpose(1, 2).reshape(B, T, HD).to(q.dtype)


def attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_lens: Tensor) -> Tensor:
    """Causal GQA attention of q [B, T, H_q * D] over the float caches, ``kv_lens`` valid slots each."""
    return attend(q, k_cache, v_cache, kv_lens)


def _attention_fake(q, k_cache, v_cache, kv_lens):
    return torch.empty_like(q)


# ============================================================================ KV cache: quantized
def kv_cache_store_quant_reference(
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    k_params: Tensor,
    v_cache: Tensor,
    v_params: Tensor,
    cache_seqlens: Tensor,
    bits: int,
    clip: float,
) -> Tensor:
    """Quantize k, v (asymmetric, one group per token and head) and write codes and (scale, zero)."""
    B, T, _ = k.shape
    _, H, S, _ = k_cache.shape
    D = k.shape[-1] // H
    pos = _positions(cache_seqlens, T, S)
    for new, cache, params in ((k, k_cache, k_params), (v, v_cache, v_params)):
        codes, p = quant.kv_quantize(new.view(B, T, H, D), bits, clip)
        _store(cache, quant.kv_pack(codes, bits), pos)
        _store(params, p, pos)
    return (cache_seqlens + T).to(torch.int32)


def _kv_cache_store_quant_fake(k, v, k_cache, k_params, v_cache, v_params, cache_seqlens, bits, clip):
    return torch.empty_like(cache_seqlens, dtype=torch.int32)


def kv_cache_dequantize(cache: Tensor, params: Tensor, bits: int, upto: int, dtype=torch.float32) -> Tensor:
    """The first ``upto`` slots of a quantized cache as [B, H, upto, D] in ``dtype``."""
    return quant.kv_dequantize(quant.kv_unpack(cache[:, :, :upto], bits), params[:, :, :upto], dtype)


def attention_quant_kv_reference(
    q: Tensor, k_cache: Tensor, k_params: Tensor, v_cache: Tensor, v_params: Tensor, kv_lens: Tensor, bits: int
) -> Tensor:
    """``attention`` over a quantized cache: K and V dequantized to float32, then the same maths."""
    S_used = int(kv_lens.max()) if q.shape[0] else 0
    cdt = quant.compute_dtype(q)
    k = kv_cache_dequantize(k_cache, k_params, bits, S_used, cdt)
    v = kv_cache_dequantize(v_cache, v_params, bits, S_used, cdt)
    return attend(q, k, v, kv_lens)


def _attention_quant_kv_fake(q, k_cache, k_params, v_cache, v_params, kv_lens, bits):
    return torch.empty_like(q)


# ============================================================================ activation quantization
def _qtensor_fake(x: Tensor, fmt: str, group_size: int, n_outliers: int, outlier_format: str) -> QTensor:
    *lead, K = x.shape
    Kn = K - n_outliers
    qK = Kn // 2 if quant.is_packed(fmt) else Kn
    out_dtype = x.dtype if outlier_format == "fp16" else torch.int8
    return (
        x.new_empty(*lead, qK, dtype=torch.int8),
        x.new_empty(*lead, Kn // group_size, dtype=torch.float32),
        x.new_empty(*lead, n_outliers, dtype=out_dtype),
        x.new_empty(*lead, 1, dtype=torch.float32),
    )


def quantize_act_reference(
    x: Tensor, fmt: str, group_size: int, n_outliers: int, outlier_format: str, clip: float
) -> QTensor:
    """Dynamic per-token quantization: groups of the normal channels, the outliers (last) in INT8."""
    return quant.quantize_rows(x, fmt, group_size, n_outliers, outlier_format, clip)


def _quantize_act_fake(x, fmt, group_size, n_outliers, outlier_format, clip):
    return _qtensor_fake(x, fmt, group_size, n_outliers, outlier_format)


def dequantize_act_reference(
    q: Tensor,
    scales: Tensor,
    outliers: Tensor,
    outlier_scales: Tensor,
    fmt: str,
    group_size: int,
    outlier_format: str,
    dtype: torch.dtype,
) -> Tensor:
    """The fake-quant values of a quantized activation, in ``dtype``."""
    return quant.dequantize_rows(q, scales, outliers, outlier_scales, fmt, group_size, outlier_format, 1, dtype)


def _dequant_fake(q, scales, outliers, fmt, group_size, dtype):
    Kn = q.shape[-1] * (2 if quant.is_packed(fmt) else 1)
    return q.new_empty(*q.shape[:-1], Kn + outliers.shape[-1], dtype=dtype)


def _dequantize_act_fake(q, scales, outliers, outlier_scales, fmt, group_size, outlier_format, dtype):
    return _dequant_fake(q, scales, outliers, fmt, group_size, dtype)


def dequantize_weight_reference(
    q: Tensor,
    scales: Tensor,
    outliers: Tensor,
    outlier_scales: Tensor,
    fmt: str,
    group_size: int,
    outlier_format: str,
    rows_per_scale: int,
    dtype: torch.dtype,
) -> Tensor:
    """The fake-quant values of a quantized weight [N, K], in ``dtype``."""
    return quant.dequantize_rows(
        q, scales, outliers, outlier_scales, fmt, group_size, outlier_format, rows_per_scale, dtype
    )


def _dequantize_weight_fake(q, scales, outliers, outlier_scales, fmt, group_size, outlier_format, rows_per_scale, dtype):
    return _dequant_fake(q, scales, outliers, fmt, group_size, dtype)


# ============================================================================ fused quantizers
def rms_norm_quant_reference(
    x: Tensor,
    weight: Tensor,
    eps: float,
    perm: Tensor | None,
    fmt: str,
    group_size: int,
    n_outliers: int,
    outlier_format: str,
    clip: float,
) -> QTensor:
    """RMSNorm + reorder (gather by ``perm``) + per-token quantization, in one op."""
    normed = _rms_norm(x, weight, eps, perm)
    return quant.quantize_rows(normed, fmt, group_size, n_outliers, outlier_format, clip)


def _rms_norm_quant_fake(x, weight, eps, perm, fmt, group_size, n_outliers, outlier_format, clip):
    return _qtensor_fake(x, fmt, group_size, n_outliers, outlier_format)


def silu_mul_quant_reference(
    gate: Tensor, up: Tensor, fmt: str, group_size: int, n_outliers: int, outlier_format: str, clip: float
) -> QTensor:
    """SiLU(gate) * up, then per-token quantization (its channels already in down_proj's order)."""
    h = torch.nn.functional.silu(gate) * up
    return quant.quantize_rows(h, fmt, group_size, n_outliers, outlier_format, clip)


def _silu_mul_quant_fake(gate, up, fmt, group_size, n_outliers, outlier_format, clip):
    return _qtensor_fake(gate, fmt, group_size, n_outliers, outlier_format)


def gather_quant_reference(
    x: Tensor, perm: Tensor, fmt: str, group_size: int, n_outliers: int, outlier_format: str, clip: float
) -> QTensor:
    """Gather channels by ``perm`` (the o_proj input order), then per-token quantization."""
    return quant.quantize_rows(x.index_select(-1, perm), fmt, group_size, n_outliers, outlier_format, clip)


def _gather_quant_fake(x, perm, fmt, group_size, n_outliers, outlier_format, clip):
    return _qtensor_fake(x, fmt, group_size, n_outliers, outlier_format)


# ============================================================================ quantized GEMMs
def quant_linear_reference(
    xq: Tensor,
    xs: Tensor,
    xo: Tensor,
    xos: Tensor,
    wq: Tensor,
    ws: Tensor,
    wo: Tensor,
    wos: Tensor,
    bias: Tensor | None,
    act_format: str,
    weight_format: str,
    group_size: int,
    outlier_format: str,
    rows_per_scale: int,
    dtype: torch.dtype,
) -> Tensor:
    """Quantized activations times quantized weights (W4A4 with INT8 outliers and friends).

    y = sum_g xs[:, g] * ws[:, g] * (xq_g . wq_g) + xos * wos * (xo . wo) + bias.

    Each group's integer dot product is exact (int32 semantics, ``quant.integer_matmul``); the groups
    are scaled in float32 and summed in order g = 0, 1, ..., then the outlier term, then the bias.
    """
    lead = xq.shape[:-1]
    xi = quant.decode_codes(xq, act_format, group_size).reshape(-1, xs.shape[-1] * group_size)
    wi = quant.decode_codes(wq, weight_format, group_size)
    sa = xs.reshape(-1, xs.shape[-1]).float()
    sw = ws.float() if rows_per_scale == 1 else ws.float().repeat_interleave(rows_per_scale, dim=0)
    amax = -quant.int_range(act_format)[0]
    wmax = -quant.int_range(weight_format)[0]
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    acc = torch.zeros(xi.shape[0], wi.shape[0], dtype=acc_dtype, device=xq.device)
    sa, sw = sa.to(acc_dtype), sw.to(acc_dtype)
    G = sa.shape[-1]
    # every group's integer dot products in one batched matmul, exact in this dtype (see integer_matmul)
    mm = quant.exact_matmul_dtype(group_size, amax, wmax)
    parts = torch.bmm(xi.to(mm).reshape(-1, G, group_size).transpose(0, 1),  # [G, M, g]
                      wi.to(mm).reshape(-1, G, group_size).permute(1, 2, 0))  # [G, g, N]
    for g in range(G):
        acc += parts[g].to(acc_dtype).mul_(sa[:, g : g + 1]).mul_(sw[:, g])  # (sum * s_act) * s_weight, in order
    n_out = xo.shape[-1]
    if n_out:
        xo2 = xo.reshape(-1, n_out)
        osw = wos.float() if rows_per_scale == 1 else wos.float().repeat_interleave(rows_per_scale, dim=0)
        if outlier_format == "fp16":
            part = xo2.to(acc_dtype) @ wo.to(acc_dtype).t()
        else:
            part = quant.integer_matmul(xo2, wo, 128, 128).float()
        acc += part.to(acc_dtype).mul_(xos.reshape(-1, 1).to(acc_dtype)).mul_(osw.reshape(1, -1).to(acc_dtype))
    if bias is not None:
        acc += bias.to(acc_dtype)
    return acc.to(dtype).reshape(*lead, wi.shape[0])


def _quant_linear_fake(xq, xs, xo, xos, wq, ws, wo, wos, bias, act_format, weight_format, group_size, outlier_format,
      rows_per_scale, dtype):
    return xq.new_empty(*xq.shape[:-1], wq.shape[0], dtype=dtype)


def weight_only_linear_reference(
    x: Tensor,
    wq: Tensor,
    ws: Tensor,
    wo: Tensor,
    wos: Tensor,
    bias: Tensor | None,
    weight_format: str,
    group_size: int,
    outlier_format: str,
    rows_per_scale: int,
) -> Tensor:
    """Float activations times quantized weights (W4A16): the weight is dequantized, then a float GEMM."""
    w = quant.dequantize_rows(wq, ws, wo, wos, weight_format, group_size, outlier_format, rows_per_scale, x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def _weight_only_linear_fake(x, wq, ws, wo, wos, bias, weight_format, group_size, outlier_format, rows_per_scale):
    return x.new_empty(*x.shape[:-1], wq.shape[0])


# ============================================================================ registration
# name -> (reference implementation, fake implementation, mutated arguments)
_OPS = {
    "rms_norm": (rms_norm_reference, _rms_norm_fake, ()),
    "rope": (rope_reference, _rope_fake, ()),
    "hadamard_heads": (hadamard_heads_reference, _hadamard_heads_fake, ()),
    "kv_cache_store": (kv_cache_store_reference, _kv_cache_store_fake, ("k_cache", "v_cache")),
    "attention": (attention_reference, _attention_fake, ()),
    "kv_cache_store_quant": (
        kv_cache_store_quant_reference, _kv_cache_store_quant_fake, ("k_cache", "k_params", "v_cache", "v_params")
    ),
    "attention_quant_kv": (attention_quant_kv_reference, _attention_quant_kv_fake, ()),
    "quantize_act": (quantize_act_reference, _quantize_act_fake, ()),
    "dequantize_act": (dequantize_act_reference, _dequantize_act_fake, ()),
    "dequantize_weight": (dequantize_weight_reference, _dequantize_weight_fake, ()),
    "rms_norm_quant": (rms_norm_quant_reference, _rms_norm_quant_fake, ()),
    "silu_mul_quant": (silu_mul_quant_reference, _silu_mul_quant_fake, ()),
    "gather_quant": (gather_quant_reference, _gather_quant_fake, ()),
    "quant_linear": (quant_linear_reference, _quant_linear_fake, ()),
    "weight_only_linear": (weight_only_linear_reference, _weight_only_linear_fake, ()),
}

REFERENCE_IMPLS: dict = {}  # OpOverload -> reference function (what the CPU lowering binds)

for _name, (_ref, _fake, _mutates) in _OPS.items():
    _op = torch.library.custom_op(f"atom::{_name}", _ref, mutates_args=_mutates)
    _op.register_fake(_fake)
    REFERENCE_IMPLS[getattr(torch.ops.atom, _name).default] = _ref


def atom_ops() -> dict[str, torch._ops.OpOverload]:
    """Every op of the ``atom`` namespace, by name."""
    return {n: getattr(torch.ops.atom, n).default for n in _OPS}
