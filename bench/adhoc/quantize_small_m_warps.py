"""The block and gather quantizers at decode sizes (16-256 rows of 4096), each with 2-16 warps per row and the
default (H100 output: quantize_small_m_warps_h100.json).

    PYTHONPATH=. python bench/adhoc/quantize_small_m_warps.py bench/adhoc/quantize_small_m_warps_h100.json
"""

import sys, torch, json
from atom_compile.passes.outlier_analysis import block_channel_order
from atom_compile.runtime_kernels.quantize import gather_quant, plan_blocks, rms_norm_quant
from bench.common import bench_us
from bench.bench_quantize import _rows, EPS, CLIP
K, g, n_out = 4096, 128, 128
dev = "cuda"
w = (torch.rand(K, device=dev) + 0.5).to(torch.bfloat16)
perm = block_channel_order(torch.randperm(K, generator=torch.Generator().manual_seed(0)), n_out, g).to(dev)
plan = plan_blocks(perm, n_out, g)
qa = ("int4", g, n_out, "int8", CLIP)
res = {}
for M in (16, 64, 128, 256):
    x = _rows(M, K, dev, 0)
    for nw in (None, 2, 4, 8, 16):
        for name, fn in (("rms block", lambda: rms_norm_quant(x, w, EPS, plan, *qa, num_warps=nw)),
                         ("gather block", lambda: gather_quant(x, plan, *qa, num_warps=nw)),
                         ("rms perm", lambda: rms_norm_quant(x, w, EPS, perm, *qa, num_warps=nw)),
                         ("gather perm", lambda: gather_quant(x, perm, *qa, num_warps=nw))):
            us = bench_us(fn); res[f"M={M} {name} warps={nw}"] = us
            print(f"M={M:4d} {name:14s} warps={nw}: {us:6.2f} us", flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
