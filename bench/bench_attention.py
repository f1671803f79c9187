"""Attention over the 4-bit KV cache (runtime_kernels/kv_attention.py) against torch SDPA on a bf16 cache.

    python -m bench.bench_attention --out bench/results/attention_h100.json
    python -m bench.bench_attention --quick           # a few seconds
    python -m bench.bench_attention --sweep           # also time split-KV / tile configurations

Decode: batch 64, context 2048, 32 query heads of 128, with 32 KV heads (MHA) and 8 (GQA). Ours reads
64 + 64 code bytes and 8 param bytes per token and KV head, SDPA 512 (bf16 K and V). SDPA gets the same
shapes with its default backend choice (``enable_gqa`` for GQA). Prefill: T = 2048 new tokens for B = 1
and 4, on an empty cache (SDPA with is_causal) and after a 2048-token cache (SDPA with the equivalent
boolean mask), with GQA 4; and 4096 tokens with MHA (the Llama-7B layer's prefill). A second row per case times the
dense prefill path (``prefix_len``: K/V dequantized once, then cuDNN's flash attention), which the runtime takes when
every sequence's cache held the same number of tokens before the step. Every configuration is checked against the reference op first (on the first sequences).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from atom_compile import ops
from atom_compile.runtime_kernels.kv_attention import attention_config, attention_quant_kv, kv_cache_store_quant
from bench.common import bench_us, copy_bandwidth_gbs, report


def _cache(B, Hkv, S, D, dev, seed):
    """A 4-bit cache filled by the quantizing store from random K/V (with outlier channels), plus the bf16 K/V."""
    g = torch.Generator(device=dev).manual_seed(seed)
    k = torch.randn(B, S, Hkv * D, device=dev, generator=g)
    k[..., :: D // 8] *= 6
    v = torch.randn(B, S, Hkv * D, device=dev, generator=g)
    kc = torch.empty(B, Hkv, S, D // 2, dtype=torch.uint8, device=dev)
    vc = torch.empty_like(kc)
    kp = torch.empty(B, Hkv, S, 2, dtype=torch.float16, device=dev)
    vp = torch.empty_like(kp)
    kv_cache_store_quant(k.bfloat16(), v.bfloat16(), kc, kp, vc, vp, torch.zeros(B, dtype=torch.int32, device=dev))
    kb = k.bfloat16().view(B, S, Hkv, D).transpose(1, 2).contiguous()
    vb = v.bfloat16().view(B, S, Hkv, D).transpose(1, 2).contiguous()
    return (kc, kp, vc, vp), (kb, vb)


def _check(q, cache, lens, nb=4, **kw):
    """rel err of the kernel against the reference op on the first ``nb`` sequences (bf16 output)."""
    sl = [t[:nb] for t in cache]
    out = attention_quant_kv(q[:nb], *sl, lens[:nb], 4, **kw)
    ref = ops.attention_quant_kv_reference(q[:nb], *sl, lens[:nb], 4)
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert err < 1e-2, f"rel err {err}"
    return err


def _decode_rows(B, ctx, Hq, Hkv, D, dev, copy_gbs, sweep, sweep_gqa=True):
    cache, (kb, vb) = _cache(B, Hkv, ctx, D, dev, seed=Hkv)
    q = torch.randn(B, 1, Hq * D, device=dev).bfloat16()
    lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
    err = _check(q, cache, lens)
    nbytes = B * Hkv * ctx * (D + 8) + 2 * q.numel() * 2
    sdpa_bytes = B * Hkv * ctx * D * 2 * 2 + 2 * q.numel() * 2
    qs = q.view(B, 1, Hq, D).transpose(1, 2)
    gqa = Hkv != Hq
    sdpa = lambda: F.scaled_dot_product_attention(qs, kb, vb, enable_gqa=gqa)  # noqa: E731
    sdpa_us = bench_us(sdpa)
    label = f"decode {'GQA' if gqa else 'MHA'} B={B} ctx={ctx} Hq={Hq} Hkv={Hkv} D={D}"
    rows = []
    configs = [("default", {})]
    if not gqa:  # the default for one query row per KV head is the CUDA-core row kernel; the tensor-core one too
        configs.append(("tensor-core kernel", dict(row_kernel=False)))
    if sweep and gqa and sweep_gqa:
        configs += [(f"splits={s},BN={bn}", dict(num_splits=s, block_n=bn)) for s in (1, 2, 4, 8) for bn in (64, 128)]
        configs += [(f"warps={w},stages={st}", dict(num_warps=w, num_stages=st)) for w in (2, 4, 8) for st in (2, 3, 4)]
    if sweep and not gqa:
        configs += [(f"row BN={bn},warps={w},acc_rows={ar},splits={s}",
                     dict(block_n=bn, num_warps=w, acc_rows=ar, num_splits=s))
                    for bn, w, ar in ((16, 1, 8), (16, 1, 16), (32, 1, 8), (32, 1, 32), (32, 2, 16), (64, 2, 16), (128, 4, 32))
                    for s in (1, 2, 4)]
    for name, kw in configs:
        if kw:
            _check(q, cache, lens, **kw)
        us = bench_us(lambda kw=kw: attention_quant_kv(q, *cache, lens, 4, max_seqlen=ctx, **kw))
        cfg = attention_config(q, cache[0], max_seqlen=ctx, **kw)
        kind = "row kernel" if cfg["row_kernel"] else "tensor cores"
        rows.append(dict(case=label, config=f"{name} ({kind}, {cfg['num_splits']} splits, BN {cfg['block_n']})", us=us,
                         GBps=nbytes / (us * 1e-6) / 1e9, pct_copy=100 * nbytes / (us * 1e-6) / 1e9 / copy_gbs,
                         sdpa_bf16_us=sdpa_us, sdpa_GBps=sdpa_bytes / (sdpa_us * 1e-6) / 1e9,
                         speedup_vs_sdpa=sdpa_us / us, rel_err=err))
    # ragged lengths (SDPA cannot take them without a mask): ours only, the same cache
    g = torch.Generator(device=dev).manual_seed(1)
    rlens = torch.randint(1, ctx + 1, (B,), device=dev, generator=g, dtype=torch.int32)
    rerr = _check(q, cache, rlens)
    rus = bench_us(lambda: attention_quant_kv(q, *cache, rlens, 4, max_seqlen=ctx))
    rbytes = int(rlens.sum()) * Hkv * (D + 8) + 2 * q.numel() * 2
    rows.append(dict(case=label.replace("decode", "decode ragged"), config="default", us=rus,
                     GBps=rbytes / (rus * 1e-6) / 1e9, pct_copy=100 * rbytes / (rus * 1e-6) / 1e9 / copy_gbs,
                     sdpa_bf16_us=float("nan"), sdpa_GBps=float("nan"), speedup_vs_sdpa=float("nan"), rel_err=rerr))
    return rows


def _prefill_rows(B, T, cached, Hq, Hkv, D, dev, sweep):
    S = cached + T
    cache, (kb, vb) = _cache(B, Hkv, S, D, dev, seed=T + cached)
    q = torch.randn(B, T, Hq * D, device=dev).bfloat16()
    lens = torch.full((B,), S, dtype=torch.int32, device=dev)
    err = _check(q, cache, lens, nb=1)
    qs = q.view(B, T, Hq, D).transpose(1, 2)
    gqa = Hkv != Hq
    if cached == 0:
        sdpa = lambda: F.scaled_dot_product_attention(qs, kb, vb, is_causal=True, enable_gqa=gqa)  # noqa: E731
    else:
        mask = torch.arange(S, device=dev)[None, :] <= (cached + torch.arange(T, device=dev))[:, None]
        sdpa = lambda: F.scaled_dot_product_attention(qs, kb, vb, attn_mask=mask, enable_gqa=gqa)  # noqa: E731
    sdpa_us = bench_us(sdpa)
    flops = 4 * B * Hq * D * T * (cached + (T + 1) / 2)  # QK^T and PV over the visible keys
    label = f"prefill B={B} T={T} cached={cached} Hq={Hq} Hkv={Hkv} D={D}"
    configs = [("default", {})]
    # as the runtime runs a prefill after equal cache lengths: K/V dequantized once, then cuDNN's flash attention
    configs.append((f"dense prefill (prefix_len={cached})", dict(prefix_len=cached)))
    if sweep:
        configs += [(f"BM={bm},BN={bn},warps={w},stages={st}", dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st))
                    for bm, bn, w, st in ((128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 2),
                                          (64, 128, 4, 2), (64, 128, 4, 4), (64, 128, 8, 3), (128, 128, 4, 2),
                                          (128, 64, 4, 3))]
    rows = []
    for name, kw in configs:
        if kw:
            err = _check(q, cache, lens, nb=1, **kw)
        us = bench_us(lambda kw=kw: attention_quant_kv(q, *cache, lens, 4, max_seqlen=S, **kw))
        rows.append(dict(case=label, config=name, us=us, TFLOPs=flops / (us * 1e-6) / 1e12, sdpa_bf16_us=sdpa_us,
                         sdpa_TFLOPs=flops / (sdpa_us * 1e-6) / 1e12, speedup_vs_sdpa=sdpa_us / us, rel_err=err))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="small shapes, a few seconds")
    ap.add_argument("--sweep", action="store_true", help="also time other launch configurations")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--no-gqa-sweep", action="store_true", help="with --sweep: sweep the MHA (row kernel) case only")
    ap.add_argument("--contexts", default=None, help="decode contexts, e.g. 1024,2048 (default: --context)")
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "bench_attention needs a CUDA device"
    dev = "cuda"
    B, ctx, Hq, D = args.batch, args.context, args.q_heads, args.head_dim
    if args.quick:
        B, ctx = 8, 512
    copy_gbs = copy_bandwidth_gbs(1 << 28 if args.quick else 1 << 30)
    decode = []
    for c in [int(v) for v in args.contexts.split(",")] if args.contexts else [ctx]:
        for Hkv in (Hq, Hq // 4):
            decode += _decode_rows(B, c, Hq, Hkv, D, dev, copy_gbs, args.sweep, not args.no_gqa_sweep)
            torch.cuda.empty_cache()
    report(f"Decode over the 4-bit KV cache vs SDPA on bf16 K/V; copy bandwidth {copy_gbs:.0f} GB/s", decode, None)
    prefill = []
    if not args.skip_prefill:
        T = 256 if args.quick else 2048
        # GQA 4 at T, and the Llama-7B layer's prefill (MHA, 2T tokens: bench_layer's case)
        for Bp, Tp, cached, Hkv in ((1, T, 0, Hq // 4), (4, T, 0, Hq // 4), (1, T, T, Hq // 4), (4, T, T, Hq // 4),
                                    (1, 2 * T, 0, Hq)):
            prefill += _prefill_rows(Bp, Tp, cached, Hq, Hkv, D, dev, args.sweep)
            torch.cuda.empty_cache()
        report("Prefill over the 4-bit KV cache vs SDPA on bf16 K/V", prefill, None)
    if args.out:  # one JSON: the decode rows, the prefill rows under "prefill" (their columns differ)
        report("attention_quant_kv: decode (rows) and prefill", decode, args.out,
               extra={"prefill": prefill, "copy_bandwidth_gbs": copy_gbs, "sm_scale": 1 / math.sqrt(D)})


if __name__ == "__main__":
    main()
