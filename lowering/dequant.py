"""The dequant backend (any device, meant for CPUs): quantized GEMMs as float GEMMs of dequantized operands.

    Before: %q_proj = atom.quant_linear(%xq0, %xs0, %xo0, %xos0, %wq, %ws, %wo, %wos, None, "int4", ...)
    After:  %q_proj = dequant_gemm_q_proj(%xq0, %xs0, %xo0, %xos0, ...)
            # = dequantize_rows(xq, xs, xo, xos) @ W_deq.T, with W_deq dequantized once, here

Every other op is bound to its reference implementation, so the activations are quantized exactly as
the reference backend quantizes them. Only the GEMM's float arithmetic differs: the reference sums each
group's exact integer dot product scaled in a fixed order, this backend lets one float32 matmul sum the
dequantized products (bench/diag_dequant_backend.py: 3e-7 relative on SmolLM2 shapes, 2.3-3.5x faster on a 2-core CPU;
the Triton kernels, which also sum in their own order, are held to 1e-5). The cost is memory: one float32
copy of every quantized weight. The compiler uses this backend to run calibration data through
already-quantized layers on a CPU.
"""

from __future__ import annotations

import torch

from atom_compile import quant
from atom_compile.ops import REFERENCE_IMPLS

from .binding import Binding

atom = torch.ops.atom


class DequantLinear:
    """One linear bound to its weight, dequantized once per compute dtype (float32 at lowering time)."""

    def __init__(self, name: str, weight_qtensor: tuple, weight_formats: tuple, quantized_acts: bool):
        self.__name__ = f"dequant_gemm_{name}"
        self.weight_qtensor = weight_qtensor  # (q, scales, outliers, outlier_scales): the graph's own buffers
        self.weight_formats = weight_formats  # (fmt, group_size, outlier_format, rows_per_scale)
        self.quantized_acts = quantized_acts
        self.weights: dict[torch.dtype, torch.Tensor] = {}
        self.weight(torch.float32)

    def weight(self, cdt: torch.dtype) -> torch.Tensor:
        if cdt not in self.weights:
            self.weights[cdt] = quant.dequantize_rows(*self.weight_qtensor, *self.weight_formats, cdt)
        return self.weights[cdt]

    def __call__(self, *args):
        if self.quantized_acts:  # quant_linear(xq, xs, xo, xos, wq, ws, wo, wos, bias, a_fmt, w_fmt, g, o_fmt, r, dtype)
            xq, xs, xo, xos, _wq, _ws, _wo, _wos, bias, a_fmt, _w_fmt, group_size, o_fmt, _r, dtype = args
            cdt = torch.float64 if dtype == torch.float64 else torch.float32
            x = quant.dequantize_rows(xq, xs, xo, xos, a_fmt, group_size, o_fmt, 1, cdt)
        else:  # weight_only_linear(x, wq, ws, wo, wos, bias, w_fmt, g, o_fmt, r)
            x, bias, dtype = args[0], args[5], args[0].dtype
            cdt = torch.float64 if dtype == torch.float64 else torch.float32
            x = x.to(cdt)
        y = x @ self.weight(cdt).t()
        if bias is not None:
            y = y + bias.to(cdt)
        return y.to(dtype)


class DequantGemmBinding(Binding):
    def bind(self, gm, node):
        quantized_acts = node.target == atom.quant_linear.default
        if quantized_acts:
            wq, ws, wo, wos = node.args[4:8]
            formats = tuple(node.args[10:14])
        else:
            wq, ws, wo, wos = node.args[1:5]
            formats = tuple(node.args[6:10])
        tensors = tuple(getattr(gm, n.target) for n in (wq, ws, wo, wos))
        return (DequantLinear(node.name, tensors, formats, quantized_acts), "dequant:float_gemm",
                "float GEMM of dequantized operands; weight dequantized at lowering")


BINDINGS = {op: Binding(fn, f"reference:{fn.__name__}", "plain PyTorch") for op, fn in REFERENCE_IMPLS.items()}
BINDINGS.update({
    atom.quant_linear.default: DequantGemmBinding(None, "dequant:float_gemm"),
    atom.weight_only_linear.default: DequantGemmBinding(None, "dequant:float_gemm"),
})
