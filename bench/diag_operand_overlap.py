"""Can the per-call weight unpack of the large-M GEMM hide behind compute-bound kernels on a second stream?

    python -m bench.diag_operand_overlap    (H100 output: bench/results/diag_operand_overlap_h100.txt)

At a 4096-token prefill of the Llama-7B layer the cuBLAS block-scaled FP8 GEMMs take 1758 us, and the kernels that
build their operands 156 us, most of it unpacking each 4-bit weight into a transient e4m3 copy. The weights do not
depend on the activations, so each unpack could run on a side stream while an earlier compute-bound kernel (the
attention, or the previous GEMM) runs. This times, under CUDA graphs: each kernel alone, and each pair with the
unpack forked to a second stream (event fork / join, as a lowering would emit). Overlap works where the pair takes
about the longer of the two, not their sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tabulate import tabulate

from atom_compile.runtime_kernels.fp8_blockscaled import weight_operand
from bench.common import bench_us, environment

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}


def _weight(N, K, g):
    Kn = K - 128
    wq = torch.randint(-128, 128, (N, Kn // 2), dtype=torch.int8, device="cuda", generator=g)
    wo = torch.randint(-127, 128, (N, 128), dtype=torch.int8, device="cuda", generator=g)
    return wq, wo


def _forked(main, side_fn, side):
    def run():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            side_fn()
        main()
        torch.cuda.current_stream().wait_stream(side)
    return run


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    side = torch.cuda.Stream()
    weights = {k: _weight(N, K, g) for k, (N, K) in SHAPES.items()}
    unpack = {k: (lambda w=w: weight_operand(w[0], w[1], 128)) for k, w in weights.items()}
    T, H, D = 4096, 32, 128
    q, k, v = (torch.randn(1, H, T, D, device="cuda", generator=g).bfloat16() for _ in range(3))
    attention = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    # the GEMMs as the layer runs them: e4m3 operands, 1 x 128 block scales
    fp8 = torch.float8_e4m3fn
    gemm = {}
    for name, (N, K) in SHAPES.items():
        Kt = K - 128 + 512
        a8 = torch.randint(-8, 8, (T, Kt), device="cuda", generator=g).to(fp8)
        w8 = weight_operand(*weights[name], 128).view(fp8)
        sa = torch.rand(Kt // 128, T, device="cuda", generator=g).t()
        sb = torch.rand(Kt // 128, N, device="cuda", generator=g).t()
        gemm[name] = (lambda a8=a8, w8=w8, sa=sa, sb=sb: F.scaled_mm(
            a8, w8.t(), sa, F.ScalingType.BlockWise1x128, sb, F.ScalingType.BlockWise1x128, output_dtype=torch.bfloat16))
    rows = []
    alone = {f"unpack {n}": bench_us(f) for n, f in unpack.items()}
    alone["attention (SDPA, cuDNN)"] = bench_us(attention)
    alone.update({f"GEMM {n}": bench_us(f) for n, f in gemm.items()})
    for name, us in alone.items():
        rows.append(dict(case=name, us=us, alone_sum_us=us, overlap_saved_pct=float("nan")))
    # what the layer could overlap: o / gate_up unpacks under the attention; each GEMM with the next one's unpack
    pairs = [("attention (SDPA, cuDNN)", attention, "unpack o", unpack["o"]),
             ("attention (SDPA, cuDNN)", attention, "unpack gate_up", unpack["gate_up"]),
             ("GEMM qkv", gemm["qkv"], "unpack o", unpack["o"]),
             ("GEMM o", gemm["o"], "unpack gate_up", unpack["gate_up"]),
             ("GEMM gate_up", gemm["gate_up"], "unpack down", unpack["down"]),
             ("GEMM down", gemm["down"], "unpack qkv", unpack["qkv"])]
    for a_name, a_fn, b_name, b_fn in pairs:
        us = bench_us(_forked(a_fn, b_fn, side))
        s = alone[a_name] + alone[b_name]
        hidden = (s - us) / alone[b_name]  # 1: the unpack is free, 0: serialized
        rows.append(dict(case=f"{a_name} || {b_name}", us=us, alone_sum_us=s, overlap_saved_pct=100 * hidden))
    env = environment()
    print(f"# {env.get('device')}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    print("# overlap_saved_pct: share of the unpack's own time hidden by the overlap (100: free, 0: serialized)")
    print(tabulate(rows, headers="keys", floatfmt=".1f"))


if __name__ == "__main__":
    main()
