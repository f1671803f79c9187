"""Where a chunk order puts each run's two halves inside its group, timed (16k x 4096 bf16, random outliers, H100).

    PYTHONPATH=. python bench/adhoc/quantize_chunk_placement.py --out bench/adhoc/quantize_chunk_placement_h100.json

"lo/hi": a run of 16 channels has its first 8 at positions 8k.. of the group's first half and its last 8 at the same
positions of the second half (one thread holds both: one 32-byte sector, in two load instructions); what
``chunk_channel_order`` made until this experiment. "lane pairs": the same groups with their positions permuted (so
the same codes and scales up to position) so that, in the launch's tile layout (16 consecutive positions per thread,
4 threads per half group), two neighbouring threads' first load instructions read the two halves of one run: [R0 0-7
| R1 0-7 | R0 8-15 | R1 8-15] per 32 positions, every sector of an instruction used whole; the second half group
the same with the group's other four runs. What ``chunk_channel_order`` makes since. The block order (one run per
group) is the reference. The committed output was measured at commit 2f39956, where ``chunk_channel_order`` made
lo/hi (this script then built the lane pairs from it; now it undoes the library's placement) and the kernel loaded
only the first half's run starts when the second half is a fixed 8 channels further (the lo/hi case; dropped since:
both halves' starts are loaded for every order that is not a block order)."""

import argparse

import torch

from atom_compile.passes.outlier_analysis import block_channel_order, chunk_channel_order
from atom_compile.runtime_kernels.quantize import gather_quant, plan_blocks, rms_norm_quant
from bench.bench_quantize import CLIP, EPS, _rows
from bench.common import bench_us, copy_bandwidth_gbs, report


def runs_in_rank_order(order: torch.Tensor, n_out: int, g: int) -> torch.Tensor:
    """[runs, 16] the chunk order's runs, each group's in rank order (undoing ``chunk_channel_order``'s placement,
    lane pairs for 4 or more runs per group)."""
    return order[: order.numel() - n_out].view(-1, 2, g // 64, 2, 2, 8).transpose(3, 4).reshape(-1, 16)


def placed(runs: torch.Tensor, g: int, lane_pairs: bool) -> torch.Tensor:
    per = g // 16
    r = runs.view(-1, per, 2, 8)  # [groups, runs, 2 parts, 8]
    if lane_pairs:  # [groups, halves, pairs, 2 runs, 2 parts, 8] -> [..., 2 parts, 2 runs, 8]
        return r.view(-1, 2, per // 4, 2, 2, 8).transpose(3, 4).flatten()
    return r.transpose(1, 2).flatten()


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
    runs, outliers = runs_in_rank_order(chunks, n_out, g), chunks[K - n_out:]
    orders = {"block order": block_channel_order(scores, n_out, g),
              "chunk order, lo/hi": torch.cat([placed(runs, g, False), outliers]),
              "chunk order, lane pairs": torch.cat([placed(runs, g, True), outliers])}
    assert torch.equal(orders["chunk order, lane pairs"], chunks)  # (the library's placement since 2f39956)
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
                rows.append(dict(round=rnd, order=name, kernel=kernel, swapped=p.n_swapped,
                                 us=us, pct_copy=100 * nbytes / (us * 1e-6) / 1e9 / copy))
    report(f"Chunk placement, 16k x {K} bf16; copy {copy:.0f} GB/s", rows, args.out, extra={"copy_bandwidth_gbs": copy})


if __name__ == "__main__":
    main()
