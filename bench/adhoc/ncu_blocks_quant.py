"""Three rms_norm_quant calls of the block kernel at 16k x 4096 (bf16, Llama-7B's size, the block order from random
outliers: 119 swapped positions), for ncu to profile one of them:

    ncu --kernel-name regex:_row_blocks --launch-skip 1 --launch-count 1 --section SourceCounters \\
        -o rep python bench/adhoc/ncu_blocks_quant.py   (PYTHONPATH=.)
    ncu --import rep.ncu-rep --page source --print-source sass --csv > rep_sass.csv
    python -m bench.ncu_sass_counts rep_sass.csv --items 16384 --warps 4 --elements 4096
"""

import torch

from atom_compile.passes.outlier_analysis import block_channel_order
from atom_compile.runtime_kernels.quantize import plan_blocks, rms_norm_quant
from bench.bench_quantize import CLIP, EPS, _rows

K, g, n_out = 4096, 128, 128
x = _rows(16384, K, "cuda", 0)
w = (torch.rand(K, device="cuda") + 0.5).to(torch.bfloat16)
perm = block_channel_order(torch.randperm(K, generator=torch.Generator().manual_seed(0)), n_out, g).to("cuda")
plan = plan_blocks(perm, n_out, g)
for _ in range(3):
    rms_norm_quant(x, w, EPS, plan, "int4", g, n_out, "int8", CLIP)
torch.cuda.synchronize()
