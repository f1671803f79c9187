"""GQA decode with head_dim 128 (32 query / 8 KV heads): 256-key tiles, 8 warps and 2 pipeline stages against the
defaults (128 keys, 4 warps, 3 stages).

    python -m bench.diag_gqa_d128_tiles    (H100 output: bench/results/diag_gqa_d128_tiles_h100.txt)
"""

from __future__ import annotations

import torch

from atom_compile.runtime_kernels.kv_attention import attention_quant_kv
from bench.bench_attention import _cache, _check
from bench.common import bench_us


def main() -> None:
    for B, ctx in ((64, 2048), (64, 1024), (16, 4096)):
        Hq, Hkv, D = 32, 8, 128
        cache, (kb, vb) = _cache(B, Hkv, ctx, D, "cuda", seed=1)
        q = torch.randn(B, 1, Hq * D, device="cuda").bfloat16()
        lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        res = []
        configs = [dict(block_n=bn, num_splits=s, num_warps=w, num_stages=st)
                   for bn in (128, 256) for s in (1, 2, 3) for w in (4, 8) for st in (2, 3)]
        for kw in [{}] + configs:
            _check(q, cache, lens, **kw)
            us = bench_us(lambda kw=kw: attention_quant_kv(q, *cache, lens, 4, max_seqlen=ctx, **kw))
            res.append((us, str(kw)))
        d = res[0]
        res.sort()
        print(f"B={B} ctx={ctx}: default {d[0]:.1f}; best: " + "; ".join(f"{u:.1f} {c}" for u, c in res[:4]), flush=True)


if __name__ == "__main__":
    main()
