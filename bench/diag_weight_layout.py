"""Does the packed weight's layout limit the small-M GEMM's read rate? A read-only probe with the GEMM's grid.

    python -m bench.diag_weight_layout    (H100 output: bench/results/diag_weight_layout_h100.txt)

At M = 16 the kernel's first group completes 5 us after entry on 4096 x 4096 (``diag_gemm_timeline``): the whole
9.2 MB weight read is in flight at once and arrives at ~1.8 TB/s. Each TMA box of a group is 64 rows x 64 bytes taken
from rows 1,984 bytes apart. This times kernels that only read the weight (TMA boxes, pipelined like the GEMM, summed
so nothing is optimized away) with the GEMM's grid: boxes from the row-major packed weight (as now), and from a copy
tiled at prepare time so that each box is 4 KB of contiguous memory; plus a plain streaming read of the same bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from tabulate import tabulate
from triton.tools.tensor_descriptor import TensorDescriptor

from bench.common import bench_us, environment


@triton.jit
def _read_boxes(w_desc, out_ptr, G, ITERS: tl.constexpr, NSPLIT: tl.constexpr, TILED: tl.constexpr,
                BLOCK_N: tl.constexpr, HALF: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = pid % NSPLIT
    pid_n = pid // NSPLIT
    acc = tl.zeros([BLOCK_N, HALF], dtype=tl.int32)
    for i in tl.range(ITERS):
        g = tl.minimum(pid_k * ITERS + i, G - 1)
        if TILED:
            w = w_desc.load([(pid_n * G + g) * BLOCK_N, 0])
        else:
            w = w_desc.load([pid_n * BLOCK_N, g * HALF])
        acc += w.to(tl.int32)
    tl.store(out_ptr + pid, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _stream(src, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for off in tl.range(pid * BLOCK, n, tl.num_programs(0) * BLOCK, num_stages=4):
        acc += tl.load(src + off + tl.arange(0, BLOCK), mask=off + tl.arange(0, BLOCK) < n, other=0).to(tl.int32)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


def main() -> None:
    env = environment()
    rows = []
    BN, HALF = 64, 64
    for N, K, splits in ((4096, 4096, (8, 4)), (11008, 4096, (3, 2)), (4096, 11008, (8, 4))):
        G = (K - 128) // 128
        nbytes = N * G * HALF
        copies = max(1, (150 << 20) // nbytes)
        ws = [torch.randint(-128, 128, (N, G * HALF), dtype=torch.int8, device="cuda") for _ in range(copies)]
        tiled = [w.view(N // BN, BN, G, HALF).permute(0, 2, 1, 3).contiguous().view(-1, HALF) for w in ws]
        out = torch.empty(1 << 16, dtype=torch.int32, device="cuda")
        for s in splits:
            iters = triton.cdiv(G, s)
            grid = (N // BN * s,)
            for name, ts, is_tiled, block in (("row-major (now)", ws, False, [BN, HALF]),
                                              ("tiled at prepare", tiled, True, [BN, HALF])):
                descs = [TensorDescriptor.from_tensor(t, block) for t in ts]
                fns = [lambda d=d: _read_boxes[grid](d, out, G, ITERS=iters, NSPLIT=s, TILED=is_tiled, BLOCK_N=BN,
                                                     HALF=HALF, num_warps=4, num_stages=4) for d in descs]
                us = bench_us(fns[0], rotate=fns)
                rows.append(dict(shape=f"{N}x{K}", splits=s, programs=grid[0], layout=name, us=us,
                                 TBps=nbytes / us / 1e6))
        fns = [lambda w=w: _stream[(132 * 4,)](w, out, w.numel(), BLOCK=4096, num_warps=4) for w in ws]
        us = bench_us(fns[0], rotate=fns)
        rows.append(dict(shape=f"{N}x{K}", splits="-", programs=528, layout="streaming read, same bytes", us=us,
                         TBps=nbytes / us / 1e6))
    print(f"# {env.get('device')}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    print(tabulate(rows, headers="keys", floatfmt=".2f"))


if __name__ == "__main__":
    main()
