"""The Triton backend (CUDA): the fused quantizers, the W4A4 GEMM and the 4-bit KV cache on Hopper kernels.

Each binding checks the node's formats at lowering time and falls back to the reference implementation
(recorded as such in the kernel table) where the kernel does not cover them: the kernels handle INT4
activations and weights with INT8 outliers, power-of-two groups >= 32, one weight scale per row, and a
4-bit KV cache with head_dim 64 or 128. The W4A4 GEMM's weight layout is prepared once, here.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from atom_compile import runtime_kernels as rk
from atom_compile.kv_cache import current_uniform_cache_length
from atom_compile.ops import REFERENCE_IMPLS

from .binding import Binding

atom = torch.ops.atom


def _reference(op, why: str):
    fn = REFERENCE_IMPLS[op]
    return fn, f"reference:{fn.__name__}", f"fallback: {why}"


def _int4_act(fmt, group_size, outlier_format) -> str | None:
    if fmt != "int4" or outlier_format != "int8":
        return f"formats {fmt}/{outlier_format}"
    if group_size < 32 or group_size & (group_size - 1):
        return f"group size {group_size}"
    return None


# The quantizers write the GEMM's MMA operand (int8 holding 16 * code, channel order) instead of packed nibbles
# when every reader of their codes is a W4A4 GEMM kernel: the GEMM then loads it by TMA with no unpacking.
X16_ACTIVATIONS = True


def _gemm_why_not(node: fx.Node) -> str | None:
    """Why a quant_linear node does not bind to the W4A4 GEMM kernel (None: it does)."""
    _xq, _xs, _xo, _xos, _wq, _ws, _wo, _wos, _bias, a_fmt, w_fmt, group_size, o_fmt, rows_per_scale, _ = node.args
    why = _int4_act(a_fmt, group_size, o_fmt) or (None if w_fmt == "int4" else f"weight format {w_fmt}")
    if why is None and rows_per_scale != 1:
        why = f"weight_channel_group {rows_per_scale}"
    return why


def _codes_only_read_by_gemm_kernels(node: fx.Node) -> bool:
    """Every user of the quantizer's codes (output 0) is the activation input of a GEMM bound to the kernel."""
    if any(g.target is not operator.getitem for g in node.users):
        return False
    readers = [(g, u) for g in node.users if g.args[1] == 0 for u in g.users]
    return bool(readers) and all(u.target is atom.quant_linear.default and u.args[0] is g and g not in u.args[1:]
                                 and _gemm_why_not(u) is None for g, u in readers)


class _X16Quantizer:
    """A quantizer kernel called with x16=True (a named callable: FX code generation needs a __name__).

    ``gemms``: (N, group size, output dtype) of the GEMMs that read its codes. When every one of them will take
    cuBLAS's block-scaled path for this call's token count, the codes are written as e4m3 straight into that
    GEMM's operand buffer (``x16="e4m3"``) instead of int8 16 * code, which saves the GEMM a pass over them."""

    def __init__(self, fn, gemms: list[tuple[int, int, torch.dtype]]):
        self.fn = fn
        self.gemms = gemms
        self.__name__ = f"{fn.__name__}_x16"

    def __call__(self, *args):
        x = args[0]
        M = x.numel() // x.shape[-1] if x.dim() else 0
        blockscaled = M > 0 and all(rk.takes_blockscaled_path(M, N, g, dt, x.device)
                                    for N, g, dt in self.gemms)
        return self.fn(*args, x16="e4m3" if blockscaled else True)


class _BlockOrderQuantizer:
    """A quantizer called with its channel order's BlockPlan (made once, here) in place of the order tensor: the
    kernel then loads each group as runs of 8 or more consecutive channels instead of gathering every channel."""

    def __init__(self, fn, perm_index: int, plan):
        self.fn = fn
        self.perm_index = perm_index
        self.plan = plan
        self.__name__ = f"{fn.__name__}_blocks"

    def __call__(self, *args, **kwargs):
        args = list(args)
        args[self.perm_index] = self.plan
        return self.fn(*args, **kwargs)


# the channel-order argument of the quantizers that take one
_PERM_ARG = {atom.rms_norm_quant.default: 3, atom.gather_quant.default: 1}


class QuantizerBinding(Binding):
    """rms_norm_quant, silu_mul_quant, gather_quant: one row-wise kernel each."""

    def bind(self, gm, node):
        fmt, group_size, n_out, outlier_format = node.args[-5:-1]
        why = _int4_act(fmt, group_size, outlier_format) or (None if group_size in (64, 128) else f"group {group_size}")
        if why:
            return _reference(node.target, why)
        fn, how = self.fn, "one program per token row, fp32 statistics"
        perm = node.args[_PERM_ARG[node.target]] if node.target in _PERM_ARG else None
        plan = None
        if isinstance(perm, fx.Node) and perm.op == "get_attr":
            plan = rk.plan_blocks(getattr(gm, perm.target), n_out, group_size)
        if plan is not None:
            fn = _BlockOrderQuantizer(fn, _PERM_ARG[node.target], plan)
            how += f"; channel order in runs: 16-byte group loads, {plan.n_swapped} swapped channels patched"
        if X16_ACTIVATIONS and _codes_only_read_by_gemm_kernels(node):
            node.meta["atom.x16"] = True
            gemms = [(getattr(gm, u.args[4].target).shape[0], u.args[11], u.args[14])
                     for g in node.users if g.args[1] == 0 for u in g.users]
            return (_X16Quantizer(fn, gemms), self.name,
                    how + "; codes written as int8 16 * code for the GEMM "
                    "(as e4m3 into its cuBLAS operand when the call takes the large-M path)")
        return fn, self.name, how


class W4A4Linear:
    """The bound GEMM of one linear: its weight in the kernel's layout, prepared at lowering time."""

    def __init__(self, name: str, prepared, out_dtype: torch.dtype, x_unpacked: bool = False):
        self.__name__ = f"w4a4_gemm_{name}"
        self.prepared = prepared
        self.out_dtype = out_dtype
        self.x_unpacked = x_unpacked

    def __call__(self, xq, xs, xo, xos, wq, ws, wo, wos, bias, *formats):
        lead = xq.shape[:-1]
        y = rk.w4a4_gemm(xq.reshape(-1, xq.shape[-1]), xs.reshape(-1, xs.shape[-1]), xo.reshape(-1, xo.shape[-1]),
                         xos.reshape(-1, 1), self.prepared, bias, self.out_dtype, x_unpacked=self.x_unpacked)
        return y.reshape(*lead, y.shape[-1])


class GemmBinding(Binding):
    def bind(self, gm, node):
        xq, xs, xo, xos, wq, ws, wo, wos, bias, a_fmt, w_fmt, group_size, o_fmt, rows_per_scale, dtype = node.args
        why = _gemm_why_not(node)
        if why:
            return _reference(node.target, why)
        tensors = [getattr(gm, n.target) for n in (wq, ws, wo, wos)]
        prepared = rk.prepare_weight(*tensors, group_size)
        x16 = isinstance(xq, fx.Node) and xq.target is operator.getitem and xq.args[0].meta.get("atom.x16", False)
        return (W4A4Linear(node.name, prepared, dtype, x_unpacked=x16), "triton:w4a4_gemm",
                "int8 wgmma over unpacked nibbles, TMA, split-K for small M; tiles tuned per M bucket"
                + ("; activations arrive as int8 16 * code" if x16 else ""))


class KVStoreBinding(Binding):
    def bind(self, gm, node):
        bits = node.args[7]
        if bits != 4:
            return _reference(node.target, f"{bits}-bit KV")
        return self.fn, self.name, "one program per block of (token, head) rows; fp16 (scale, zero)"


def attention_quant_kv(q, k_cache, k_params, v_cache, v_params, kv_lens, bits):
    """The Triton attention, told by the runtime the cache length all sequences shared before this step, if any."""
    return rk.attention_quant_kv(q, k_cache, k_params, v_cache, v_params, kv_lens, bits,
                                 prefix_len=current_uniform_cache_length())


class KVAttentionBinding(Binding):
    def bind(self, gm, node):
        bits = node.args[6]
        if bits != 4:
            return _reference(node.target, f"{bits}-bit KV")
        return self.fn, self.name, ("CUDA-core row kernel for one query row per KV head (MHA decode); split-KV "
                                    "flash decoding for <= 64 query rows, flash-attention tiles above; a prefill of >= "
                                    f"{rk.kv_attention.DENSE_PREFILL_MIN_T} half-precision tokens after equal "
                                    "cache lengths: K/V dequantized once, then cuDNN's flash attention")


class HadamardBinding(Binding):
    def bind(self, gm, node):
        D = node.args[1]
        if D < 16 or D & (D - 1):
            return _reference(node.target, f"head_dim {D}")
        return self.fn, self.name, "one program per 64 (token, head) rows; +-1 matrix on tensor cores, fp32 sum"


def rope_or_reference(x, cos, sin):
    """The RoPE kernel, or the reference op for the dtype / layout combinations the kernel does not take."""
    try:
        return rk.rope(x, cos, sin)
    except NotImplementedError:
        return REFERENCE_IMPLS[atom.rope.default](x, cos, sin)


BINDINGS = {op: Binding(fn, f"reference:{fn.__name__}", "plain PyTorch") for op, fn in REFERENCE_IMPLS.items()}
BINDINGS.update({
    atom.rms_norm_quant.default: QuantizerBinding(rk.rms_norm_quant, "triton:rms_norm_quant"),
    atom.silu_mul_quant.default: QuantizerBinding(rk.silu_mul_quant, "triton:silu_mul_quant"),
    atom.gather_quant.default: QuantizerBinding(rk.gather_quant, "triton:gather_quant"),
    atom.hadamard_heads.default: HadamardBinding(rk.hadamard_heads, "triton:hadamard_heads"),
    atom.rope.default: Binding(rope_or_reference, "triton:rope", "one program per token row; bit-exact "
                               "(reference op for other dtypes or a non-contiguous last dim)"),
    atom.quant_linear.default: GemmBinding(None, "triton:w4a4_gemm"),
    atom.kv_cache_store_quant.default: KVStoreBinding(rk.kv_cache_store_quant, "triton:kv_cache_store_quant"),
    atom.attention_quant_kv.default: KVAttentionBinding(attention_quant_kv, "triton:attention_quant_kv"),
})
