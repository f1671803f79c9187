"""GQA decode with head_dim 64 (SmolLM2: 9 query / 3 KV heads; and 8 / 2): warps per program, keys per tile and
split-KV over batch and context, against SDPA on a bf16 cache.

    python -m bench.diag_gqa_d64_warps    (H100 output: bench/results/diag_gqa_d64_warps_h100.txt)

Keys of the printout: (warps, keys per tile, programs per SM the split-KV aims at). Sets attention_config's
two-warp rule for head_dim 64 (decode with at least 128 (sequence, KV head) programs before splitting). The first
run (the output file) took the default before the rule; "default" is whatever attention_config picks when run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from atom_compile.runtime_kernels.kv_attention import _decode_splits, attention_quant_kv
from bench.bench_attention import _cache
from bench.common import bench_us, environment


def _case(Hq, Hkv, B, ctx, ratios):
    D = 64
    cache, (kb, vb) = _cache(B, Hkv, ctx, D, "cuda", seed=1)
    q = torch.randn(B, 1, Hq * D, device="cuda").bfloat16()
    lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    qs = q.view(B, 1, Hq, D).transpose(1, 2)
    sdpa = bench_us(lambda: F.scaled_dot_product_attention(qs, kb, vb, enable_gqa=True))
    out = {}
    for w in (2, 4):
        for bn in (128, 256):
            for per_sm in (4, 6, 8):
                kw = dict(block_n=bn, num_splits=_decode_splits(B * Hkv, ctx, bn, 132, per_sm), num_warps=w)
                out[(w, bn, per_sm)] = bench_us(lambda kw=kw: attention_quant_kv(q, *cache, lens, 4, max_seqlen=ctx, **kw))
    out["default"] = bench_us(lambda: attention_quant_kv(q, *cache, lens, 4, max_seqlen=ctx))
    for k, us in out.items():
        ratios.setdefault(k, []).append(us / sdpa)
    best = min((k for k in out if k != "default"), key=out.get)
    print(f"{Hq}/{Hkv} B={B} ctx={ctx}: SDPA {sdpa:.1f}, default {out['default']:.1f}, best {out[best]:.1f} {best}, "
          f"w2bn128ps4 {out[(2, 128, 4)]:.1f}, w2bn256ps4 {out[(2, 256, 4)]:.1f}, w4bn256ps4 {out[(4, 256, 4)]:.1f}",
          flush=True)


def main() -> None:
    env = environment()
    print(f"# {env.get('device')}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    ratios: dict = {}
    for Hq, Hkv in ((9, 3), (8, 2)):
        for B in (1, 16, 64, 128):
            for ctx in (512, 2048, 4096):
                _case(Hq, Hkv, B, ctx, ratios)
    print("geomean time / SDPA over the cases (lower is better):")
    for k, v in sorted(ratios.items(), key=lambda kv: sum(map(math.log, kv[1]))):
        print(k, f"{math.exp(sum(map(math.log, v)) / len(v)):.3f}", f"worst {max(v):.2f}")


if __name__ == "__main__":
    main()
