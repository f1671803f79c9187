"""Where the small-M W4A4 GEMM's time goes, from globaltimer stamps inside the kernel (``_launch(trace=...)``).

    python -m bench.diag_gemm_timeline    (H100 output: bench/results/diag_gemm_timeline_h100.txt)

Each program stamps (ns): entry, after its first group, after its group loop, after the outlier dot, after its
split-K arrival (atomic), and (the last arriver of a tile) after the reduction and the output store. Printed: the
median program's phases, the spread of entries (how long the grid takes to start), and the span from the first
entry to the last exit, next to the graph-timed call (bench_us) and an empty kernel with the same grid in the same
harness (launch + graph floor). The L2 is flushed before each traced call.
"""

from __future__ import annotations

import statistics

import torch
import triton
import triton.language as tl

from bench.bench_gemm import GROUP, make_problem, n_sets, weight_bytes, wk
from bench.common import bench_us, environment


@triton.jit
def _empty_kernel(p):
    pass


def _case(N, K, M, flush):
    _, _, xq, wq = make_problem(M, N, K)
    x16 = wk.unpack_activations(xq[0], GROUP)
    G = x16.shape[1] // GROUP
    cfg = wk.pick_config(M, N, G)
    pw0 = wk.prepare_weight(*wq, GROUP)
    k = n_sets(weight_bytes(pw0))
    pws = [pw0] + [wk.prepare_weight(*(t.clone() for t in wq), GROUP) for _ in range(k - 1)]
    out = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
    xs, xo, xos = xq[1].float(), xq[2], xq[3].reshape(M, 1).float()
    fns = [lambda p=p: wk._launch(x16, xs, xo, xos, p, None, out, cfg, x_given_unpacked=True) for p in pws]
    call_us = bench_us(fns[0], rotate=fns)
    tiles = triton.cdiv(N, cfg.block_n) * triton.cdiv(M, cfg.block_m)
    split = triton.cdiv(G, triton.cdiv(G, cfg.split_k))
    grid = tiles * split
    empty_us = bench_us(lambda: _empty_kernel[(grid,)](out))
    phases = {k: [] for k in ("start spread", "entry -> first group done", "first group -> loop end",
                              "loop end -> outliers done", "-> partial stored + arrival", "arrival -> reduced + stored",
                              "first entry -> last exit")}
    for _ in range(7):
        trace = torch.zeros(grid, 8, dtype=torch.int64, device="cuda")
        flush.zero_()
        torch.cuda.synchronize()
        wk._launch(x16, xs, xo, xos, pw0, None, out, cfg, x_given_unpacked=True, trace=trace)
        torch.cuda.synchronize()
        t = trace.cpu()
        t0 = int(t[:, 0].min())
        last = t[:, 5] > 0
        phases["start spread"].append(int(t[:, 0].max()) - t0)
        phases["entry -> first group done"].append(statistics.median((t[:, 1] - t[:, 0]).tolist()))
        phases["first group -> loop end"].append(statistics.median((t[:, 2] - t[:, 1]).tolist()))
        phases["loop end -> outliers done"].append(statistics.median((t[:, 3] - t[:, 2]).tolist()))
        phases["-> partial stored + arrival"].append(statistics.median((t[:, 4] - t[:, 3]).tolist()))
        phases["arrival -> reduced + stored"].append(statistics.median((t[last, 5] - t[last, 4]).tolist()))
        phases["first entry -> last exit"].append(int(t[:, 5].max()) - t0)
        sms = len(set(t[:, 7].tolist()))
    print(f"\n{N} x {K}, M = {M}: config {cfg}, {grid} programs on {sms} SMs, {weight_bytes(pw0) / 1e6:.2f} MB of weights")
    print(f"  graph-timed call {call_us:.2f} us; empty kernel, same grid, same harness {empty_us:.2f} us")
    for k, v in phases.items():
        print(f"  {k:32s} {statistics.median(v) / 1000:6.2f} us (median of 7 traced calls)")


def main() -> None:
    env = environment()
    print(f"# {env.get('device')}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    flush = torch.empty(64 << 20, dtype=torch.int8, device="cuda")
    for N, K, M in ((4096, 4096, 16), (4096, 4096, 64), (11008, 4096, 16), (11008, 4096, 64)):
        _case(N, K, M, flush)


if __name__ == "__main__":
    main()
