"""Experiment (2026-11-22, kept for the record; not used by the compiler): a large-M W4A4 GEMM on FP8 e4m3 tensor cores
whose group dot Triton 3.6 makes asynchronous, so that the per-group rescale of group g-1 runs under the MMA of group g.

Triton never makes an int32-accumulating dot asynchronous (WGMMAPipeline.cpp, rule 2.1: fp32 accumulators only). With
FP8 operands (int4 codes are exact in e4m3) and a tiny synchronous dot at the top of the loop (its wait(0) drains the
previous group's dot; the group dot's result is then only loop-carried, so it is "properly async" by rule 3b), the
TTGIR has no wait after the group dot and the SASS issues QGMMA, then the rescale FFMAs. Outcome on the H100: 258 us
at 4096^3 against 250 us for the int8 kernel (the synchronous FP8 variant 276 us): the loop is bound by its
~1,300 instructions per group per warp, not by the waits. Outliers are included; output checked against the int8
kernel (relative difference < 1e-5).

    python -m bench.diag_fp8_async_gemm 1024,4096   # writes $OUT/gemm_h100_fp8_async_prototype.json (or /tmp)
"""

import torch, triton, triton.language as tl, os
from triton.tools.tensor_descriptor import TensorDescriptor

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"

@triton.jit
def _nib_e4m3(p, USE_ASM: tl.constexpr):
    """packed bytes (channel 2j in bits 0-3, 2j+1 in bits 4-7) -> (e4m3 of low code, e4m3 of high code) as int8."""
    if USE_ASM:
        lo, hi = tl.inline_asm_elementwise(
            """{
            .reg .b32 a, b, c, d, t, k, x, y;
            .reg .b16 e0, e1, e2, e3;
            mov.b32 k, 0x64086408;
            lop3.b32 a, $2, 0x000F000F, 0x64086408, 0x6A;
            shr.b32 t, $2, 8;
            lop3.b32 b, t, 0x000F000F, 0x64086408, 0x6A;
            shr.b32 t, $2, 4;
            lop3.b32 c, t, 0x000F000F, 0x64086408, 0x6A;
            shr.b32 t, $2, 12;
            lop3.b32 d, t, 0x000F000F, 0x64086408, 0x6A;
            sub.f16x2 a, a, k;
            sub.f16x2 b, b, k;
            sub.f16x2 c, c, k;
            sub.f16x2 d, d, k;
            cvt.rn.satfinite.e4m3x2.f16x2 e0, a;
            cvt.rn.satfinite.e4m3x2.f16x2 e1, b;
            cvt.rn.satfinite.e4m3x2.f16x2 e2, c;
            cvt.rn.satfinite.e4m3x2.f16x2 e3, d;
            mov.b32 x, {e0, e1};
            mov.b32 y, {e2, e3};
            prmt.b32 $0, x, 0, 0x3120;
            prmt.b32 $1, y, 0, 0x3120;
            }""",
            "=r,=r,r", [p], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    else:
        lo = ((p << 4) >> 4).to(tl.float16).to(tl.float8e4nv).to(tl.int8, bitcast=True)
        hi = (p >> 4).to(tl.float16).to(tl.float8e4nv).to(tl.int8, bitcast=True)
    return lo, hi


@triton.jit
def _fp8_kernel(x_desc, xs_ptr, w_desc, wst_ptr, out_ptr, dz_ptr, xo_desc, xos_ptr, wo_desc, wos_ptr, M, N, G, s_xs, s_out,
                NOUT: tl.constexpr,
                HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr,
                ITERS: tl.constexpr, USE_ASM: tl.constexpr, DUMMY: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    gsz = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % gsz
    pid_n = (pid % in_group) // gsz
    n0 = pid_n * BLOCK_N
    m0 = pid_m * BLOCK_M
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    p = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    sw = tl.zeros([BLOCK_N], dtype=tl.float32)
    sx = tl.zeros([BLOCK_M], dtype=tl.float32)
    da = tl.zeros([64, 16], dtype=tl.float16)
    db = tl.zeros([16, 16], dtype=tl.float16)
    dacc = tl.zeros([64, 16], dtype=tl.float32)
    for i in range(ITERS):
        if DUMMY:
            dacc = tl.dot(da, db, dacc) * 0.5  # synchronous: Triton waits (pendings 0) right after it
        w = w_desc.load([n0, i * HALF])  # [BLOCK_N, HALF] packed
        lo, hi = _nib_e4m3(w, USE_ASM)
        wf = tl.reshape(tl.join(lo, hi), [BLOCK_N, 2 * HALF]).to(tl.float8e4nv, bitcast=True)
        x = x_desc.load([m0, i * 2 * HALF])  # [BLOCK_M, 2 HALF] e4m3
        if USE_ASM:
            r = tl.dot(wf, tl.trans(x))
        else:  # the interpreter has no fp8 dot: the same exact integer products in fp32
            r = tl.dot(wf.to(tl.float32), tl.trans(x.to(tl.float8e4nv, bitcast=True).to(tl.float32)), input_precision="ieee")
        acc = tl.fma(p * sw[:, None], sx[None, :], acc)  # the previous group's rescale, while r runs
        sw = tl.load(wst_ptr + i * N + offs_n, mask=n_mask, other=0.0)
        sx = tl.load(xs_ptr + offs_m * s_xs + i, mask=m_mask, other=0.0)
        p = r
    acc = tl.fma(p * sw[:, None], sx[None, :], acc)
    if NOUT > 0:
        wo = wo_desc.load([n0, 0])
        xo = xo_desc.load([m0, 0])
        do = tl.dot(wo, tl.trans(xo), out_dtype=tl.int32)
        swo = tl.load(wos_ptr + offs_n, mask=n_mask, other=0.0)
        sxo = tl.load(xos_ptr + offs_m, mask=m_mask, other=0.0)
        acc = tl.fma(do.to(tl.float32), swo[:, None] * sxo[None, :], acc)
    out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * s_out + offs_n[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])
    if DUMMY:
        if M < 0:
            tl.store(dz_ptr + tl.arange(0, 16), tl.sum(dacc, 0))


def repack_interleaved(wq, g):
    """half-split packed group bytes (byte j = ch j | ch j+g/2 << 4) -> adjacent pairs (ch 2j | ch 2j+1 << 4)."""
    N, kh = wq.shape
    b = wq.view(torch.uint8).reshape(N, kh // (g // 2), g // 2).int()
    lo, hi = b & 15, b >> 4
    codes = torch.cat([lo, hi], -1)  # [N, G, g] unsigned nibbles in channel order
    pairs = codes.reshape(N, -1, g // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8).view(torch.int8).reshape(N, kh)


def gemm_fp8(x8, xs, wq_il, ws_t, g, xo=None, xos=None, wo=None, wos=None, BN=64, BM=128, warps=4, stages=3, dummy=True, group_m=8, out_dtype=torch.bfloat16):
    M, K = x8.shape
    N = wq_il.shape[0]
    G = K // g
    out = torch.empty((M, N), dtype=out_dtype, device=x8.device)
    xd = TensorDescriptor.from_tensor(x8, [BM, g])
    wd = TensorDescriptor.from_tensor(wq_il, [BN, g // 2])
    dz = torch.empty(16, dtype=torch.float32, device=x8.device)
    grid = (triton.cdiv(N, BN) * triton.cdiv(M, BM),)
    nout = 0 if xo is None else xo.shape[1]
    if nout:
        xod = TensorDescriptor.from_tensor(xo, [BM, nout]); wod = TensorDescriptor.from_tensor(wo, [BN, nout])
    else:
        xod = wod = wd; xos = wos = xs
    _fp8_kernel[grid](xd, xs, wd, ws_t, out, dz, xod, xos, wod, wos, M, N, G, xs.stride(0), out.stride(0), NOUT=nout, HALF=g // 2, BLOCK_N=BN,
                      BLOCK_M=BM, GROUP_M=group_m, ITERS=G, USE_ASM=not INTERP, DUMMY=dummy,
                      num_warps=warps, num_stages=stages)
    return out


# ----------------------------------------------------------------------------------------------- benchmark
import sys, json
from bench.common import bench_us, environment
import importlib
wk = importlib.import_module("atom_compile.runtime_kernels.w4a4_gemm")


def main():
    torch.manual_seed(0)
    dev = "cuda"
    g = 128
    res = []
    shapes = [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096)]
    Ms = [int(a) for a in sys.argv[1].split(",")] if len(sys.argv) > 1 else [256, 1024, 4096]
    cfgs = [(64, 128, 4, 3, True), (64, 128, 4, 4, True), (64, 128, 4, 3, False), (128, 64, 4, 3, True), (128, 128, 8, 3, True), (64, 64, 4, 4, True), (128, 128, 8, 4, True)]
    for N, K in shapes:
        Ki = K - 128; G = Ki // g
        wc = torch.randint(-8, 8, (N, Ki), dtype=torch.int8, device=dev)
        w = wc.reshape(N, G, g)
        wq = ((w[..., : g // 2] & 15) | ((w[..., g // 2:] & 15) << 4)).to(torch.int8).reshape(N, Ki // 2)
        ws = torch.rand(N, G, device=dev) * 0.01 + 0.005
        wo = torch.randint(-127, 128, (N, 128), dtype=torch.int8, device=dev)
        wos = torch.rand(N, device=dev) * 0.001
        pw = wk.prepare_weight(wq, ws, wo, wos, g)
        wil = repack_interleaved(wq, g)
        wbf = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        for M in Ms:
            xc = torch.randint(-8, 8, (M, Ki), dtype=torch.int8, device=dev)
            x16 = (xc * 16).to(torch.int8)
            x8 = xc.float().to(torch.float8_e4m3fn)
            xs = torch.rand(M, G, device=dev) * 0.1 + 0.05
            xo = torch.randint(-127, 128, (M, 128), dtype=torch.int8, device=dev)
            xos = torch.rand(M, device=dev) * 0.01
            xbf = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            row = dict(N=N, K=K, M=M)
            row["bf16_us"] = bench_us(lambda: xbf @ wbf.T)
            y0 = wk.w4a4_gemm(x16, xs, xo, xos, pw, x_unpacked=True)
            row["int8_cur_us"] = bench_us(lambda: wk.w4a4_gemm(x16, xs, xo, xos, pw, x_unpacked=True))
            for c in cfgs:
                name = "fp8_%dx%d_w%d_s%d_%s" % (c[0], c[1], c[2], c[3], "dummy" if c[4] else "sync")
                try:
                    f = lambda: gemm_fp8(x8, xs, wil, pw.ws_t, g, xo, xos.reshape(-1), pw.wo, pw.wos, BN=c[0], BM=c[1], warps=c[2], stages=c[3], dummy=c[4])
                    y = f()
                    err = ((y.float() - y0.float()).norm() / y0.float().norm()).item()
                    row[name] = (round(bench_us(f), 1), round(err, 5))
                except Exception as e:
                    row[name] = "ERR " + type(e).__name__ + str(e)[:200]
            print(json.dumps(row), flush=True)
            res.append(row)
    os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
    json.dump(dict(env=environment(), rows=res), open(os.path.join(os.environ.get("OUT", "/tmp"), "gemm_h100_fp8_async_prototype.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
