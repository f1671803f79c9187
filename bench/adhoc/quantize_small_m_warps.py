"""The block kernel (BlockPlan) and the gather kernel (the order as a tensor) for rms_norm_quant / gather_quant at
decode sizes (16-256 rows of 4096, bf16, Llama-7B's block order from random outliers), with 2-16 warps per row and
the default:

    PYTHONPATH=. python bench/adhoc/quantize_small_m_warps.py --out bench/adhoc/quantize_small_m_warps_h100.json
"""

import argparse

import torch

from atom_compile.passes.outlier_analysis import block_channel_order
from atom_compile.runtime_kernels.quantize import gather_quant, plan_blocks, rms_norm_quant
from bench.bench_quantize import CLIP, EPS, _rows
from bench.common import bench_us, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    K, g, n_out = 4096, 128, 128
    w = (torch.rand(K, device="cuda") + 0.5).to(torch.bfloat16)
    perm = block_channel_order(torch.randperm(K, generator=torch.Generator().manual_seed(0)), n_out, g).cuda()
    plan = plan_blocks(perm, n_out, g)
    qa = ("int4", g, n_out, "int8", CLIP)
    rows = []
    for M in (16, 64, 128, 256):
        x = _rows(M, K, "cuda", 0)
        for nw in (None, 2, 4, 8, 16):
            for kernel, order, fn in (
                    ("rms_norm_quant", "block kernel", lambda: rms_norm_quant(x, w, EPS, plan, *qa, num_warps=nw)),
                    ("gather_quant", "block kernel", lambda: gather_quant(x, plan, *qa, num_warps=nw)),
                    ("rms_norm_quant", "gather kernel", lambda: rms_norm_quant(x, w, EPS, perm, *qa, num_warps=nw)),
                    ("gather_quant", "gather kernel", lambda: gather_quant(x, perm, *qa, num_warps=nw))):
                rows.append(dict(rows=M, kernel=kernel, path=order, warps=nw or "default", us=bench_us(fn)))
    report(f"Quantizers at decode sizes, K = {K}, block order vs gather kernel", rows, args.out)


if __name__ == "__main__":
    main()
