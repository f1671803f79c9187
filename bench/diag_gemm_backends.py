"""The large-M GEMM's two backends on the real SmolLM2 (bf16): per GEMM call, cuBLAS's block-scaled FP8 GEMM and our
Triton kernel on the same inputs, each against the Triton kernel's fp32 output.

Why: the bf16 GPU perplexity moved from 31.304 (Triton at large M) to 31.380 (cuBLAS) although both GEMMs are exact
up to the final bf16 rounding. This shows what differs per call (the model runs the Triton outputs; one batch of
8 windows of 512 tokens; every GEMM there has M = 4096).

    python -m bench.diag_gemm_backends --layers DIR --gguf GGUF --windows W > bench/results/diag_gemm_backends_smollm2.txt
"""
import argparse
import importlib
import json
import statistics

import torch
from pathlib import Path
from safetensors.torch import load_file
from atom_compile import models
import atom_compile.runtime_kernels as rk
from bench.gpu_ppl import build
wk = importlib.import_module("atom_compile.runtime_kernels.w4a4_gemm")
orig = rk.w4a4_gemm
stats = []
def wrapped(xq, xs, xo, xos, pw, bias=None, out_dtype=torch.bfloat16, config=None, out=None, x_unpacked=False):
    wk.set_large_m_backend("cublas_fp8")
    yc = orig(xq, xs, xo, xos, pw, bias, out_dtype, x_unpacked=x_unpacked).float()
    wk.set_large_m_backend("triton")
    yt = orig(xq, xs, xo, xos, pw, bias, out_dtype, x_unpacked=x_unpacked).float()
    y32 = orig(xq, xs, xo, xos, pw, bias, torch.float32, x_unpacked=x_unpacked)
    wk.set_large_m_backend("cublas_fp8")
    r = lambda a: ((a - y32).norm() / y32.norm()).item()
    d = (yc - yt).abs()
    i = int(d.argmax())
    stats.append(dict(M=xq.shape[0], N=pw.N, cublas=r(yc), triton=r(yt), differ=float((yc != yt).float().mean()),
                      maxdiff=float(d.max()), at=(i // pw.N, i % pw.N), yc=float(yc.flatten()[i]), yt=float(yt.flatten()[i]),
                      y32=float(y32.flatten()[i]), finite=bool(torch.isfinite(yc).all())))
    return yt.to(out_dtype)
rk.w4a4_gemm = wrapped
ap = argparse.ArgumentParser()
ap.add_argument("--layers", required=True)
ap.add_argument("--gguf", required=True)
ap.add_argument("--windows", required=True)
a = ap.parse_args()
hf_model, _ = models.load_model(a.gguf, dtype=torch.bfloat16, device="cuda")
m = build(Path(a.layers), hf_model, "triton", torch.bfloat16, fuse_siblings=True)
w = load_file(a.windows)["windows"][:8].cuda()
with torch.no_grad():
    m(w)
for s in stats[:12]:
    print(json.dumps(s))
print("mean cublas", statistics.mean(s["cublas"] for s in stats), "mean triton", statistics.mean(s["triton"] for s in stats),
      "worst differ", max(s["differ"] for s in stats), "n", len(stats))
bad = sorted(stats, key=lambda s: -s["cublas"] / max(s["triton"], 1e-12))[:5]
for s in bad: print("WORST", json.dumps(s))
