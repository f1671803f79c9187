"""Probe (2026-11-22): cuBLAS's block-scaled FP8 GEMM (`scaled_mm`, BlockWise1x128 x BlockWise1x128) on W4A4 operands
without outliers, against torch bf16 and our Triton GEMM kernel, plus the time to unpack a 4-bit weight to e4m3. This is
the measurement that led to runtime_kernels/fp8_blockscaled.py (the figures "cuBLAS's block-scaled GEMM alone" in
docs/performance.md). The scales must be column-major [M, K/128] and [N, K/128] (strides (1, M) and (1, N)).

    python -m bench.diag_blockscaled_probe   # writes $OUT/blockscaled_probe_h100.json (or /tmp)
"""
import sys, os, json, torch, triton, triton.language as tl, importlib, traceback
import torch.nn.functional as F
from bench.common import bench_us, environment
wk = importlib.import_module("atom_compile.runtime_kernels.w4a4_gemm")
dev = "cuda"; g = 128
torch.manual_seed(0)

@triton.jit
def _unpack_w_e4m3(wq_ptr, out_ptr, N, Kh, BLOCK_R: tl.constexpr, HALF: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    gi = tl.program_id(1)
    k = tl.arange(0, HALF)
    m = (r < N)[:, None]
    p = tl.load(wq_ptr + r[:, None].to(tl.int64) * Kh + gi * HALF + k[None, :], mask=m, other=0)
    lo = ((p << 4) >> 4).to(tl.float16).to(tl.float8e4nv)
    hi = (p >> 4).to(tl.float16).to(tl.float8e4nv)
    dst = out_ptr + r[:, None].to(tl.int64) * (2 * Kh) + gi * 2 * HALF + k[None, :]
    tl.store(dst, lo, mask=m)
    tl.store(dst + HALF, hi, mask=m)

def unpack_w(wq, out):
    N, Kh = wq.shape
    _unpack_w_e4m3[(triton.cdiv(N, 32), Kh // 64)](wq, out, N, Kh, BLOCK_R=32, HALF=64, num_warps=4)
    return out

ST = F.ScalingType


def main():
    res = []
    shapes = [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096), (22016, 4096)]
    for N, K in shapes:
        Ki = K - 128; G = Ki // g
        wc = torch.randint(-8, 8, (N, Ki), dtype=torch.int8, device=dev)
        w = wc.reshape(N, G, g)
        wq = ((w[..., : g // 2] & 15) | ((w[..., g // 2:] & 15) << 4)).to(torch.int8).reshape(N, Ki // 2)
        ws = torch.rand(N, G, device=dev) * 0.01 + 0.005
        wo = torch.randint(-127, 128, (N, 128), dtype=torch.int8, device=dev)
        wos = torch.rand(N, device=dev) * 0.001
        pw = wk.prepare_weight(wq, ws, wo, wos, g)
        w8 = torch.empty(N, Ki, dtype=torch.float8_e4m3fn, device=dev)
        unpack_w(wq, w8)
        assert torch.equal(w8.float(), wc.float()), "unpack wrong"
        wbf = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        for M in (16, 64, 256, 1024, 4096):
            xc = torch.randint(-8, 8, (M, Ki), dtype=torch.int8, device=dev)
            x16 = (xc * 16).to(torch.int8)
            x8 = xc.float().to(torch.float8_e4m3fn)
            xs = torch.rand(M, G, device=dev) * 0.1 + 0.05
            xo = torch.zeros((M, 128), dtype=torch.int8, device=dev)  # outliers off for the comparison
            xos = torch.zeros(M, device=dev)
            xbf = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            row = dict(N=N, K=K, M=M)
            row["bf16_us"] = round(bench_us(lambda: xbf @ wbf.T), 1)
            y0 = wk.w4a4_gemm(x16, xs, xo, xos, pw, x_unpacked=True).float()
            row["ours_us"] = round(bench_us(lambda: wk.w4a4_gemm(x16, xs, xo, xos, pw, x_unpacked=True)), 1)
            ref = None
            for name, sa, sb in (("blockfp8", xs.t().contiguous().t(), pw.ws_t.t()),):
                try:
                    f = lambda: F.scaled_mm(x8, w8.t(), sa, ST.BlockWise1x128, sb, ST.BlockWise1x128, output_dtype=torch.bfloat16)
                    y = f().float()
                    row[name + "_err"] = round(((y - y0).norm() / y0.norm()).item(), 6)
                    row[name + "_us"] = round(bench_us(f), 1)
                except Exception as e:
                    row[name] = "ERR " + type(e).__name__ + ": " + str(e)[:300]
            row["unpack_w_us"] = round(bench_us(lambda: unpack_w(wq, w8)), 1)
            print(json.dumps(row), flush=True)
            res.append(row)
    os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
    json.dump(dict(env=environment(), rows=res), open(os.path.join(os.environ.get("OUT", "/tmp"), "blockscaled_probe_h100.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
