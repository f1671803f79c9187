"""Where a chunk order puts each run's two halves inside its group, timed (16k x 4096 bf16, random outliers, H100).

    PYTHONPATH=. python bench/adhoc/quantize_chunk_placement.py --out bench/adhoc/quantize_chunk_placement_h100.json

"lo/hi" is ``chunk_channel_order`` as it is: a run of 16 channels has its first 8 at positions 8k.. of the group's
first half and its last 8 at the same positions of the second half (one thread holds both: one 32-byte sector, in
two load instructions). "lane pairs" permutes the positions inside each group (same groups, so the same codes and
scales up to position) so that, in the launch's tile layout (16 consecutive positions per thread, 4 threads per half
group), two neighbouring threads' first load instructions read the two halves of one run: [R0 0-7 | R1 0-7 | R0 8-15
| R1 8-15] per 32 positions, every sector of an instruction used whole; the second half group the same with the
group's other four runs (so the second half's run starts are loaded too: hi_delta 0). The block order (one run per
group) is the reference."""

import argparse

import torch

from atom_compile.passes.outlier_analysis import block_channel_order, chunk_channel_order
from atom_compile.runtime_kernels.quantize import gather_quant, plan_blocks, rms_norm_quant
from bench.bench_quantize import CLIP, EPS, _rows
from bench.common import bench_us, copy_bandwidth_gbs, report


def lane_pairs(order: torch.Tensor, n_out: int, g: int) -> torch.Tensor:
    """The chunk order's groups with their positions permuted as the module docstring says."""
    half = g // 2
    out = order.clone()
    normal = order[: order.numel() - n_out].view(-1, g)
    for i, grp in enumerate(normal):
        runs = [torch.cat([grp[8 * k: 8 * k + 8], grp[half + 8 * k: half + 8 * k + 8]]) for k in range(half // 8)]
        lo, hi = runs[: len(runs) // 2], runs[len(runs) // 2:]
        placed = []
        for side in (lo, hi):
            for u in range(0, len(side), 2):
                a, b = side[u], side[u + 1]
                placed += [a[:8], b[:8], a[8:], b[8:]]
        out[i * g: (i + 1) * g] = torch.cat(placed)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    M, K, g, n_out = 16384, 4096, 128, 128
    x = _rows(M, K, "cuda", 0)
    w = (torch.rand(K, device="cuda") + 0.5).to(torch.bfloat16)
    scores = torch.randperm(K, generator=torch.Generator().manual_seed(0))
    chunks = chunk_channel_order(scores, n_out, g)
    orders = {"block order": block_channel_order(scores, n_out, g), "chunk order, lo/hi": chunks,
              "chunk order, lane pairs": lane_pairs(chunks, n_out, g)}
    assert all(sorted(o.tolist()) == list(range(K)) for o in orders.values())
    plans = {k: plan_blocks(o.cuda(), n_out, g) for k, o in orders.items()}
    qa = ("int4", g, n_out, "int8", CLIP)
    copy = copy_bandwidth_gbs(1 << 30)
    nbytes = M * K * 2 + M * (K - n_out) // 2 + M * (K - n_out) // g * 4 + M * n_out + M * 4
    rows = []
    for rnd in range(args.rounds):
        for name, p in plans.items():
            for kernel, fn in (("rms_norm_quant", lambda p=p: rms_norm_quant(x, w, EPS, p, *qa)),
                               ("gather_quant", lambda p=p: gather_quant(x, p, *qa))):
                us = bench_us(fn)
                rows.append(dict(round=rnd, order=name, kernel=kernel, hi_delta=p.hi_delta, swapped=p.n_swapped,
                                 us=us, pct_copy=100 * nbytes / (us * 1e-6) / 1e9 / copy))
    report(f"Chunk placement, 16k x {K} bf16; copy {copy:.0f} GB/s", rows, args.out, extra={"copy_bandwidth_gbs": copy})


if __name__ == "__main__":
    main()
