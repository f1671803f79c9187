"""The values' MMA operand in the tensor-core attention kernel: codes moved to the operand layout, then unpacked
(the default before 2026-11-22's change), against unpacked first and moved as fp16 through shared memory
(``v_smem_f16``); GQA decode and a short prefill chunk, with a small launch sweep for each.

    python -m bench.diag_gqa_v_operand --out bench/results/diag_gqa_v_operand_h100.json

P.V's MMA K is the key, so an operand register holds consecutive keys, whose code bytes sit 64 apart in the cache:
moved as bytes they are gathered from shared memory one at a time (sm_90 has no transposing ldmatrix for 8-bit
data). Every configuration is checked against the reference op first. SDPA on a bf16 cache in the same run.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from atom_compile.runtime_kernels.kv_attention import attention_config, attention_quant_kv
from bench.bench_attention import _cache, _check
from bench.common import bench_us, report


def _decode(B, ctx, Hq, Hkv, D, configs):
    dev = "cuda"
    cache, (kb, vb) = _cache(B, Hkv, ctx, D, dev, seed=Hkv)
    q = torch.randn(B, 1, Hq * D, device=dev).bfloat16()
    lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
    qs = q.view(B, 1, Hq, D).transpose(1, 2)
    sdpa_us = bench_us(lambda: F.scaled_dot_product_attention(qs, kb, vb, enable_gqa=True))
    rows = []
    for kw in configs:
        err = _check(q, cache, lens, **kw)
        us = bench_us(lambda kw=kw: attention_quant_kv(q, *cache, lens, 4, max_seqlen=ctx, **kw))
        cfg = attention_config(q, cache[0], max_seqlen=ctx, **{k: v for k, v in kw.items() if k != "maxnreg"})
        rows.append(dict(case=f"decode B={B} ctx={ctx} Hq={Hq} Hkv={Hkv} D={D}",
                         v_smem_f16=cfg["v_smem_f16"], block_n=cfg["block_n"], splits=cfg["num_splits"],
                         maxnreg=kw.get("maxnreg", cfg["maxnreg"]) or "none", stages=cfg["num_stages"],
                         warps=cfg["num_warps"], us=us,
                         sdpa_bf16_us=sdpa_us, speedup_vs_sdpa=sdpa_us / us, rel_err=err))
    return rows


def _chunk(B, T, cached, Hq, Hkv, D, configs):
    dev = "cuda"
    S = cached + T
    cache, _ = _cache(B, Hkv, S, D, dev, seed=T)
    q = torch.randn(B, T, Hq * D, device=dev).bfloat16()
    lens = torch.full((B,), S, dtype=torch.int32, device=dev)
    rows = []
    for kw in configs:
        err = _check(q, cache, lens, nb=1, **kw)
        us = bench_us(lambda kw=kw: attention_quant_kv(q, *cache, lens, 4, max_seqlen=S, **kw))
        cfg = attention_config(q, cache[0], max_seqlen=S, **kw)
        rows.append(dict(case=f"chunk B={B} T={T} cached={cached} Hq={Hq} Hkv={Hkv} D={D}",
                         v_smem_f16=cfg["v_smem_f16"], block_n=cfg["block_n"], splits=cfg["num_splits"],
                         maxnreg=cfg["maxnreg"] or "none", stages=cfg["num_stages"], warps=cfg["num_warps"], us=us,
                         sdpa_bf16_us=float("nan"), speedup_vs_sdpa=float("nan"), rel_err=err))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--warps-sweep", action="store_true", help="sweep 1-2 warps per program instead")
    args = ap.parse_args(argv)
    sweep = [kw for f in (False, True) for kw in
             [dict(v_smem_f16=f), dict(v_smem_f16=f, maxnreg=0), dict(v_smem_f16=f, num_stages=2)] +
             [dict(v_smem_f16=f, block_n=bn, num_splits=s) for bn in (64, 128) for s in (2, 3, 4)]]
    if args.warps_sweep:  # fewer warps per program: no cross-warp softmax reductions, more programs per SM
        sweep = [dict(v_smem_f16=f, num_warps=w, block_n=bn, num_splits=s) for f in (False, True) for w in (1, 2)
                 for bn in (32, 64, 128) for s in (2, 4, 8)]
        sweep = [dict(v_smem_f16=False)] + sweep
    rows = _decode(64, 2048, 32, 8, 128, sweep)
    rows += _decode(64, 1024, 32, 8, 128, [dict(v_smem_f16=f) for f in (False, True)])
    rows += _decode(64, 2048, 9, 3, 64, [dict(v_smem_f16=f) for f in (False, True)])  # SmolLM2's heads
    rows += _chunk(1, 256, 2048, 32, 8, 128, [dict(v_smem_f16=f) for f in (False, True)])
    rows += _chunk(1, 16, 2048, 32, 8, 128, [dict(v_smem_f16=f) for f in (False, True)])
    report("GQA decode / short chunks: the values' operand as bytes (v_smem_f16=False) or as fp16 via shared memory",
           rows, args.out)


if __name__ == "__main__":
    main()
