"""Large-M W4A4 GEMM through cuBLAS's block-scaled FP8 GEMM (runtime_kernels/fp8_blockscaled.py).

Under the interpreter (CI): the operand kernels are checked bit for bit against torch (e4m3 bytes of every
code, the outlier split o = 16 h + l, the transposed block scales), and the block decomposition is checked
against ``quant_linear_reference``: the block-scaled product of the operands, done in float64 here as cuBLAS
does it on the GPU (per 128-column block: dot x token scale x row scale), equals the reference op (both exact
up to fp32 rounding). On an H100 ``w4a4_gemm`` dispatches to cuBLAS from BLOCKSCALED_MIN_M tokens on, and the
result is checked against the reference op.
"""

from __future__ import annotations

import pytest
import torch

from atom_compile.runtime_kernels import fp8_blockscaled as fb
from atom_compile.runtime_kernels.w4a4_gemm import (BLOCKSCALED_MIN_M, Config, prepare_weight, set_large_m_backend,
                                                    unpack_activations, w4a4_gemm)
from tests.kernels.test_w4a4_gemm import TOL, make_case, reference, rel_err

FP8 = torch.float8_e4m3fn


def codes_of(packed: torch.Tensor, g: int = 128) -> torch.Tensor:
    """Packed half-split int4 [R, Kn / 2] -> int8 codes [R, Kn] in channel order."""
    R, kh = packed.shape
    p = packed.reshape(R, kh // (g // 2), g // 2)
    lo = torch.bitwise_right_shift(torch.bitwise_left_shift(p, 4), 4)
    hi = torch.bitwise_right_shift(p, 4)
    return torch.cat([lo, hi], -1).reshape(R, -1)


def expected_operand(packed, outliers, n_out, weight):
    codes = codes_of(packed).float()
    P = fb._padded_outliers(n_out)
    o = torch.zeros(packed.shape[0], P)
    o[:, :n_out] = outliers[:, :n_out].float()
    lo = (o + 8) % 16 - 8
    hi = (o - lo) / 16
    parts = [hi, lo, hi, lo] if weight else [hi, hi, lo, lo]
    return torch.cat([codes] + (parts if P else []), 1)


@pytest.mark.parametrize("n_out", [128, 40, 0])
@pytest.mark.parametrize("x16", [False, True])
def test_operands_bit_exact(device, n_out, x16):
    xq, wq, _ = make_case(19, 48, 512 + n_out, 128, n_out, seed=5 + n_out, device=device, bias=False)
    xo = xq[2].clone()
    xo[0, :n_out] = -128  # the extremes of the outlier split: -128 = 16 * -8 + 0, 127 = 16 * 8 - 1
    xo[1, :n_out] = 127
    xin = unpack_activations(xq[0], 128) if x16 else xq[0]
    a8, sa_t = fb.blockscaled_operands(xin, xq[1], xo, xq[3], x_unpacked=x16)
    assert a8.shape[0] == 32 and sa_t.shape[1] == 32, "19 rows padded to a multiple of 16"
    assert not a8[19:].any() and not sa_t[:, 19:].any(), "padding rows: zero codes and scales"
    a8, sa_t = a8[:19], sa_t[:, :19]
    want = expected_operand(xq[0].cpu(), xo.cpu(), n_out, weight=False)
    assert torch.equal(a8.cpu(), want.to(FP8).view(torch.int8)), "activation e4m3 bytes"
    assert torch.equal(a8.cpu().view(FP8).float(), want)
    nb = fb._padded_outliers(n_out) // 128
    xos = xq[3].reshape(1, -1).float().cpu()
    want_s = torch.cat([xq[1].t().float().cpu()] + [16 * xos] * 2 * nb + [xos] * 2 * nb, 0)
    assert torch.equal(sa_t.cpu(), want_s)

    pw = prepare_weight(*wq, 128)
    w8 = fb.weight_operand(pw.wq, pw.wo, pw.n_out)
    want_w = expected_operand(wq[0].cpu(), wq[2].cpu(), n_out, weight=True)
    assert torch.equal(w8.cpu(), want_w.to(FP8).view(torch.int8)), "weight e4m3 bytes"


@pytest.mark.parametrize("n_out", [128, 0])
def test_block_decomposition_matches_reference(device, n_out):
    """The block-scaled product of the operands (float64, per 128-column block) is the reference op."""
    xq, wq, b = make_case(23, 64, 1024 + n_out, 128, n_out, seed=11, device=device)
    pw = prepare_weight(*wq, 128)
    a8, sa_t = fb.blockscaled_operands(*xq, x_unpacked=False)
    w8 = fb.weight_operand(pw.wq, pw.wo, pw.n_out)
    sb_t = fb.weight_scales(pw.ws_t, pw.wos, pw.n_out)
    a8, sa_t = a8[:23], sa_t[:, :23]  # (rows padded to 32)
    a = a8.cpu().view(FP8).double().reshape(23, -1, 128)
    w = w8.cpu().view(FP8).double().reshape(64, -1, 128)
    y = torch.einsum("mbk,nbk,bm,bn->mn", a, w, sa_t.cpu().double(), sb_t.cpu().double()) + b.cpu().double()
    ref = reference(xq, wq, b, 128, torch.float32)
    assert rel_err(y, ref.cpu()) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the cuBLAS block-scaled FP8 path runs on Hopper GPUs")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x16", [False, True])
def test_large_m_dispatch_matches_reference(bias, x16):
    """bf16 output (the path's only output dtype; fp32 output stays on the Triton kernel, checked below)."""
    dtype = torch.bfloat16
    M = BLOCKSCALED_MIN_M + 37
    xq, wq, b = make_case(M, 96, 1536, 128, 128, seed=13, device="cuda", bias=bias)
    if bias:  # (a bf16 model's bias is bf16; cuBLAS's epilogue takes it so, the Triton kernel in fp32)
        b = b.bfloat16().float()
    pw = prepare_weight(*wq, 128)
    assert fb.supported(torch.device("cuda"), 128, 96)
    xin = unpack_activations(xq[0], 128) if x16 else xq[0]
    out = torch.full((M, 96), float("nan"), dtype=dtype, device="cuda")
    y = w4a4_gemm(xin, *xq[1:], pw, b, dtype, out=out, x_unpacked=x16)
    assert y.data_ptr() == out.data_ptr() and not torch.isnan(y).any()
    ref = reference(xq, wq, b, 128, torch.float32)
    assert rel_err(y, ref) < 3e-3  # bf16 rounding of the result: ~1.7e-3 (TOL's 1e-2 is for every kernel path)
    # the Triton kernel on the same inputs (explicit config, or the backend switched off)
    y_triton = w4a4_gemm(xin, *xq[1:], pw, b, dtype, config=Config(block_n=64, block_m=128, num_stages=3),
                         x_unpacked=x16)
    # both are exact up to the bf16 rounding of the result: they differ only where a value is a rounding tie
    assert rel_err(y, y_triton) < 1e-4
    set_large_m_backend("triton")
    try:
        assert rel_err(w4a4_gemm(xin, *xq[1:], pw, b, dtype, x_unpacked=x16), ref) < TOL[dtype]
    finally:
        set_large_m_backend("cublas_fp8")
    with pytest.raises(ValueError, match="large-M backend"):
        set_large_m_backend("cutlass")
    assert not fb.supported(torch.device("cuda"), 128, 96, torch.float32)
    y32 = w4a4_gemm(xin, *xq[1:], pw, b, torch.float32, x_unpacked=x16)  # (the Triton kernel)
    assert rel_err(y32, ref) < TOL[torch.float32]


@pytest.mark.parametrize("quantizer", ["rms_norm_quant", "gather_quant", "silu_mul_quant"])
def test_quantizers_write_the_operand(device, quantizer):
    """x16="e4m3": a quantizer writes its codes as e4m3 into the cuBLAS operand buffer; completed in place (padding
    rows, outlier blocks, scales), the operand equals the one built from its int8 16 * code output."""
    from atom_compile import runtime_kernels as qk

    M, K, n_out = 19, 640, 128
    g = torch.Generator().manual_seed(21)
    x = (torch.randn(M, K, generator=g) * 2).to(device, torch.bfloat16)
    perm = torch.randperm(K, generator=g).to(device)
    if quantizer == "rms_norm_quant":
        w = (torch.rand(K, generator=g) + 0.5).to(device, torch.bfloat16)
        run = lambda x16: qk.rms_norm_quant(x, w, 1e-5, perm, "int4", 128, n_out, "int8", 0.9, x16=x16)  # noqa: E731
    elif quantizer == "gather_quant":
        run = lambda x16: qk.gather_quant(x, perm, "int4", 128, n_out, "int8", 0.9, x16=x16)  # noqa: E731
    else:
        up = torch.randn(M, K, generator=g).to(device, torch.bfloat16)
        run = lambda x16: qk.silu_mul_quant(x, up, "int4", 128, n_out, "int8", 0.9, x16=x16)  # noqa: E731
    q16, xs, xo, xos = run(True)
    qe, xs_e, xo_e, xos_e = run("e4m3")
    assert qe.dtype == torch.float8_e4m3fn and qe.shape == (M, 512) and qe.stride() == (512 + 4 * 128, 1)
    assert torch.equal(qe.float(), (q16.float() / 16)), "e4m3 codes = the int8 path's codes"
    assert torch.equal(xs_e, xs) and torch.equal(xo_e, xo) and torch.equal(xos_e, xos)
    a8, sa_t = fb.blockscaled_operands(qe, xs, xo, xos, x_unpacked=True)
    a8_ref, sa_ref = fb.blockscaled_operands(q16, xs, xo, xos, x_unpacked=True)
    assert a8.data_ptr() == qe.data_ptr(), "completed in place"
    assert torch.equal(a8, a8_ref) and torch.equal(sa_t, sa_ref)
    with pytest.raises(ValueError, match="operand_buffer"):
        fb.blockscaled_operands(qe.contiguous(), xs, xo, xos, x_unpacked=True)


def test_e4m3_codes_need_the_cublas_path(device):
    """e4m3 codes are only the cuBLAS path's input: anywhere else (here: the interpreter, or too few tokens)
    w4a4_gemm says so instead of misreading them."""
    from atom_compile import runtime_kernels as qk

    xq, wq, _ = make_case(19, 48, 640, 128, 128, seed=4, device=device, bias=False)
    x = torch.randn(19, 640, device=device, dtype=torch.bfloat16)
    qe, xs, xo, xos = qk.gather_quant(x, torch.arange(640, device=device), "int4", 128, 128, "int8", 0.9, x16="e4m3")
    with pytest.raises(ValueError, match="cuBLAS large-M path only"):
        w4a4_gemm(qe, xs, xo, xos, prepare_weight(*wq, 128), None, torch.bfloat16, x_unpacked=True)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the cuBLAS block-scaled FP8 path runs on Hopper GPUs")
def test_quantizer_e4m3_handoff_equals_int8_handoff():
    """A GEMM fed the quantizer's e4m3 operand gives exactly what it gives when fed the int8 16 * code codes."""
    from atom_compile import runtime_kernels as qk

    M, K = BLOCKSCALED_MIN_M + 5, 1536
    _, wq, _ = make_case(8, 96, K, 128, 128, seed=6, device="cuda", bias=False)
    pw = prepare_weight(*wq, 128)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    perm = torch.randperm(K, device="cuda")
    q16, xs, xo, xos = qk.gather_quant(x, perm, "int4", 128, 128, "int8", 0.9, x16=True)
    qe = qk.gather_quant(x, perm, "int4", 128, 128, "int8", 0.9, x16="e4m3")[0]
    y16 = w4a4_gemm(q16, xs, xo, xos, pw, None, torch.bfloat16, x_unpacked=True)
    ye = w4a4_gemm(qe, xs, xo, xos, pw, None, torch.bfloat16, x_unpacked=True)
    assert torch.equal(ye, y16)
