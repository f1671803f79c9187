"""One rms_norm_quant launch (16k x 4096 bf16, random outliers) of the block kernel on three paths, for ncu:

    blocks       the block order, one start per group (BLOCKS)
    blocks_cols  the same order through the path chunk orders take (plan.base dropped)
    chunks       the chunk order (the default)

    ncu --set full -k regex:_row_blocks --launch-skip 3 --launch-count 1 \\
        python bench/adhoc/ncu_cols_vs_blocks.py CASE

The question (docs/performance.md): why the cols path costs ~2 us over one start per group on the same order.
Without ncu it prints the three cases' times (CUDA graphs, medians). The outputs in ncu_cols_vs_blocks/:
``ncu_before_*`` ran 74c71f0's kernel (a per-position int16 cols table; the chunk order with each run over both
half groups, hi = lo + 8), ``ncu_run_starts_*`` 2f39956's (run starts, the same chunk order). Since 4bab474 the
chunk order places its runs in lane pairs, so ``chunks`` times that."""

import dataclasses
import sys

import torch

from atom_compile.passes.outlier_analysis import block_channel_order, chunk_channel_order
from atom_compile.runtime_kernels.quantize import plan_blocks, rms_norm_quant
from bench.bench_quantize import CLIP, EPS, _rows
from bench.common import bench_us

M, K, G, N_OUT = 16384, 4096, 128, 128


def case_fn(name: str):
    x = _rows(M, K, "cuda", 0)
    w = (torch.rand(K, device="cuda", generator=torch.Generator("cuda").manual_seed(1)) + 0.5).to(torch.bfloat16)
    scores = torch.randperm(K, generator=torch.Generator().manual_seed(0))
    if name == "chunks":
        plan = plan_blocks(chunk_channel_order(scores, N_OUT, G).cuda(), N_OUT, G)
    else:
        plan = plan_blocks(block_channel_order(scores, N_OUT, G).cuda(), N_OUT, G)
        if name == "blocks_cols":
            plan = dataclasses.replace(plan, base=None)
    qa = ("int4", G, N_OUT, "int8", CLIP)
    return lambda: rms_norm_quant(x, w, EPS, plan, *qa)


if __name__ == "__main__":
    names = sys.argv[1:] or ["blocks", "blocks_cols", "chunks"]
    if len(names) == 1:
        fn = case_fn(names[0])
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    else:
        fns = {n: case_fn(n) for n in names}
        for rnd in range(3):
            print(rnd, {n: round(bench_us(f), 2) for n, f in fns.items()}, flush=True)
