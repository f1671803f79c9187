"""Where the dense prefill path (K/V dequantized once, cuDNN's flash attention) overtakes the Triton tiles.

    python -m bench.diag_dense_prefill_threshold    (H100 output: bench/results/diag_dense_prefill_threshold_h100.txt)

Times ``attention_quant_kv`` with ``prefix_len`` given (dense) and not given (tiles) for chunks of T new tokens after
P cached ones, B = 1, 32 query heads of 128, MHA and GQA 4; sets ``DENSE_PREFILL_MIN_T`` (kv_attention.py).
"""

from __future__ import annotations

import torch
from tabulate import tabulate

from atom_compile.runtime_kernels import kv_attention
from atom_compile.runtime_kernels.kv_attention import attention_quant_kv
from bench.bench_attention import _cache
from bench.common import bench_us


def main() -> None:
    kv_attention.DENSE_PREFILL_MIN_T = 1
    rows = []
    for Hkv in (32, 8):
        for P in (0, 1024):
            for T in (32, 64, 128, 256, 512, 1024):
                S = P + T
                cache, _ = _cache(1, Hkv, S, 128, "cuda", seed=T)
                q = torch.randn(1, T, 32 * 128, device="cuda").bfloat16()
                lens = torch.full((1,), S, dtype=torch.int32, device="cuda")
                tiles = bench_us(lambda: attention_quant_kv(q, *cache, lens, 4, max_seqlen=S))
                dense = bench_us(lambda: attention_quant_kv(q, *cache, lens, 4, prefix_len=P))
                rows.append(dict(Hkv=Hkv, cached=P, T=T, tiles_us=tiles, dense_us=dense, dense_speedup=tiles / dense))
    print(tabulate(rows, headers="keys", floatfmt=".2f"))


if __name__ == "__main__":
    main()
