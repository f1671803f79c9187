"""W4A4 GEMM (runtime_kernels/w4a4_gemm.py) against torch bf16, FP8 and INT8 matrix products on the GPU.

For each (N, K) and M: check ours against ``quant_linear_reference`` on the GPU (max relative error over
fp32 and bf16 outputs), then time, each under CUDA graphs (``bench.common.bench_us``, median):

- bf16:  ``x @ w.T`` (cuBLAS)
- fp8:   ``torch._scaled_mm`` with e4m3 operands, rowwise scales (and tensorwise scales with fast
         accumulation; the faster of the two is the "fp8" column)
- int8:  ``torch._int_mm`` with B column-major (needs M > 16: shown as '-' at M = 16)
- ours:  ``w4a4_gemm`` on already-quantized activations: the GEMM alone, activation quantization excluded

K counts all input channels: K = 4096 is 3968 int4 channels (31 groups of 128) + 128 int8 outliers.
TFLOP/s = 2 M N K / time for every column. Inputs rotate over several copies when one set fits in L2.

    python -m bench.bench_gemm --out bench/results/gemm_h100.json [--quick] [--tune]

``--tune`` also times a list of candidate configurations per (shape, M) (compiled in parallel first) and
records the best, which is how ``pick_config``'s table was made.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict

import torch

from bench.common import bench_us, report

try:  # (import_module: the package re-exports a function of the same name as this module)
    wk = importlib.import_module("atom_compile.runtime_kernels.w4a4_gemm")
except ImportError:  # repo not installed (the GPU machine): runtime_kernels/ is importable from the root
    wk = importlib.import_module("runtime_kernels.w4a4_gemm")
from atom_compile import quant
from atom_compile.ops import quant_linear_reference

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096)]
MS = [16, 64, 256, 1024, 4096]
GROUP, N_OUT = 128, 128
L2_BYTES = 50 * 2**20


def make_problem(M, N, K, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, K, device=device, generator=g)
    x[:, -N_OUT:] *= 30.0  # the outlier channels (last after reordering)
    w = torch.randn(N, K, device=device, generator=g) * 0.02
    xq = quant.quantize_rows(x, "int4", GROUP, N_OUT, "int8", 0.9)
    wq = quant.quantize_rows(w, "int4", GROUP, N_OUT, "int8", 0.85)
    return x, w, xq, wq


def n_sets(nbytes: int) -> int:
    """Input copies to rotate over so that consecutive calls do not hit in L2."""
    return max(1, min(16, math.ceil(3 * L2_BYTES / max(nbytes, 1)))) if nbytes < 2 * L2_BYTES else 1


def weight_bytes(pw) -> int:
    return sum(t.numel() * t.element_size() for t in (pw.wq, pw.ws_t, pw.wo, pw.wos))


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def time_ours(xq, wq, cfg=None, reps=50) -> float:
    pw0 = wk.prepare_weight(*wq, GROUP)
    k = n_sets(weight_bytes(pw0))
    pws = [pw0] + [wk.prepare_weight(*(t.clone() for t in wq), GROUP) for _ in range(k - 1)]
    outs = [torch.empty(xq[0].shape[0], pw0.N, dtype=torch.bfloat16, device="cuda") for _ in range(k)]
    fns = [lambda p=p, o=o: wk.w4a4_gemm(*xq, p, None, torch.bfloat16, config=cfg, out=o) for p, o in zip(pws, outs)]
    return bench_us(fns[0], rotate=fns, reps=reps)


def time_baselines(x, w) -> dict:
    M, K = x.shape
    N = w.shape[0]
    res = {}
    xb = x.bfloat16()
    wb = w.bfloat16()
    k = n_sets(wb.numel() * 2)
    ws = [wb] + [wb.clone() for _ in range(k - 1)]
    res["bf16"] = bench_us(None, rotate=[lambda w_=w_: xb @ w_.t() for w_ in ws])
    x8 = (x / x.abs().amax() * 400).to(torch.float8_e4m3fn)
    w8 = (w / w.abs().amax() * 400).to(torch.float8_e4m3fn)
    k = n_sets(w8.numel())
    w8s = [w8] + [w8.clone() for _ in range(k - 1)]
    sa = torch.ones(M, 1, device="cuda")
    sb = torch.ones(1, N, device="cuda")
    one = torch.ones((), device="cuda")
    fp8 = {}
    try:
        fp8["rowwise"] = bench_us(None, rotate=[lambda w_=w_: torch._scaled_mm(x8, w_.t(), scale_a=sa, scale_b=sb,
                                                                             out_dtype=torch.bfloat16) for w_ in w8s])
    except Exception as e:  # noqa: BLE001
        print("fp8 rowwise failed:", repr(e)[:200])
    try:
        fp8["tensorwise_fast"] = bench_us(None, rotate=[lambda w_=w_: torch._scaled_mm(
            x8, w_.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True) for w_ in w8s])
    except Exception as e:  # noqa: BLE001
        print("fp8 tensorwise failed:", repr(e)[:200])
    res["fp8_variants"] = fp8
    res["fp8"] = min(fp8.values()) if fp8 else None
    xi = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
    wi = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
    wis = [wi] + [wi.clone() for _ in range(n_sets(wi.numel()) - 1)]
    try:
        res["int8"] = bench_us(None, rotate=[lambda w_=w_: torch._int_mm(xi, w_.t()) for w_ in wis])
    except Exception as e:  # noqa: BLE001  (_int_mm needs M > 16)
        print(f"int8 _int_mm at M={M}: {type(e).__name__}")
        res["int8"] = None
    return res


def verify(xq, wq) -> float:
    pw = wk.prepare_weight(*wq, GROUP)
    ref = quant_linear_reference(*xq, *wq, None, "int4", "int4", GROUP, "int8", 1, torch.float32)
    errs = []
    for dt in (torch.float32, torch.bfloat16):
        out = torch.full((xq[0].shape[0], pw.N), float("nan"), dtype=dt, device="cuda")
        y = wk.w4a4_gemm(*xq, pw, None, dt, out=out)
        torch.cuda.synchronize()
        assert not torch.isnan(y).any(), "unwritten or NaN output"
        errs.append(rel_err(y, ref))
    assert errs[0] < 1e-5 and errs[1] < 1e-2, errs
    return max(errs)


# ----------------------------------------------------------------------------------------------- tuning
def candidates(M: int, N: int, G: int) -> list:
    C = wk.Config
    out = []
    if M <= 64:
        bm = max(16, 1 << (M - 1).bit_length())
        for bn in (64, 128):
            tiles = math.ceil(N / bn) * math.ceil(M / bm)
            splits = sorted({max(1, min(G // 2, round(w * 132 / tiles))) for w in (1, 2, 4)})
            for s in splits:
                for st in (4, 6):
                    out.append(C(block_n=bn, block_m=bm, split_k=s, num_warps=4, num_stages=st))
        out.append(C(block_n=64, block_m=bm, split_k=out[2].split_k, num_warps=4, num_stages=4, dot_fp8=True))
    elif M <= 256:
        for bn, bm in ((64, 64), (128, 64), (64, 128)):
            for s in (1, 2):
                for xu in (False, True):
                    out.append(C(block_n=bn, block_m=bm, split_k=s, num_warps=4, num_stages=4, x_unpacked=xu))
    else:
        for bn, bm, nw in ((64, 128, 4), (128, 64, 4), (128, 128, 8), (64, 256, 8)):
            for xu in (False, True):
                for st in (3, 4):
                    out.append(C(block_n=bn, block_m=bm, split_k=1, num_warps=nw, num_stages=st, x_unpacked=xu))
        out.append(C(block_n=64, block_m=128, num_warps=4, num_stages=4, dot_fp8=True))
        out.append(C(block_n=64, block_m=128, num_warps=4, num_stages=4, x_unpacked=True, magic=False))
    return out


def _compile_job(args):
    """Worker: run one configuration once so that Triton compiles it into the shared on-disk cache."""
    M, N, K, cfg = args
    try:
        _, _, xq, wq = make_problem(M, N, K, seed=1)
        pw = wk.prepare_weight(*wq, GROUP)
        wk.w4a4_gemm(*xq, pw, None, torch.bfloat16, config=cfg)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001
        return f"{asdict(cfg)} M={M} N={N} K={K}: {type(e).__name__}: {str(e)[:300]}"


def precompile(jobs, workers: int) -> None:
    t = time.time()
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        errs = [e for e in ex.map(_compile_job, jobs) if e]
    print(f"precompiled {len(jobs)} jobs in {time.time() - t:.0f}s; {len(errs)} failed", flush=True)
    for e in errs[:20]:
        print("  compile failure:", e)


def tune_one(xq, wq, ref, M, N, G) -> list:
    rows = []
    pw = wk.prepare_weight(*wq, GROUP)
    for cfg in candidates(M, N, G):
        try:
            y = wk.w4a4_gemm(*xq, pw, None, torch.float32, config=cfg)
            err = rel_err(y, ref)
            us = time_ours(xq, wq, cfg, reps=20)
            rows.append(dict(cfg=asdict(cfg), us=us, err=err))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(cfg=asdict(cfg), us=None, err=None, error=f"{type(e).__name__}: {str(e)[:200]}"))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="two shapes, three M")
    ap.add_argument("--tune", action="store_true", help="also time candidate configurations")
    ap.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,12288x4096 (N x K)")
    ap.add_argument("--ms", default=None, help="e.g. 16,4096")
    ap.add_argument("--budget", type=float, default=None, help="seconds: stop tuning (not timing) after this")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gemm needs a CUDA device")
    shapes = SHAPES[:2] if args.quick else SHAPES
    ms = [16, 256, 4096] if args.quick else MS
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]

    jobs = [(M, N, K, None) for N, K in shapes for M in ms]
    if args.tune:
        jobs += [(M, N, K, c) for N, K in shapes for M in ms for c in candidates(M, N, (K - N_OUT) // GROUP)]
    precompile(jobs, args.workers)

    t_start = time.time()
    rows, tuning = [], []
    for N, K in shapes:
        for M in ms:
            x, w, xq, wq = make_problem(M, N, K)
            try:
                err = verify(xq, wq)
            except Exception as e:  # noqa: BLE001  (recorded, and the row is marked failed)
                print(f"VERIFY FAILED N={N} K={K} M={M}: {e!r}"[:500], flush=True)
                err = float("nan")
            base = time_baselines(x, w)
            cfg = wk.pick_config(M, N, (K - N_OUT) // GROUP)
            try:
                ours = time_ours(xq, wq)
            except Exception as e:  # noqa: BLE001
                print(f"OURS FAILED N={N} K={K} M={M}: {e!r}"[:500], flush=True)
                ours = float("nan")
            flop = 2 * M * N * K

            def tf(us):
                return None if us is None else flop / us / 1e6

            row = dict(N=N, K=K, M=M, bf16_us=base["bf16"], fp8_us=base["fp8"], int8_us=base["int8"], ours_us=ours,
                       ours_tflops=tf(ours), bf16_tflops=tf(base["bf16"]),
                       x_bf16=base["bf16"] / ours, x_fp8=None if base["fp8"] is None else base["fp8"] / ours,
                       x_int8=None if base["int8"] is None else base["int8"] / ours, max_rel_err=err,
                       config=f"n{cfg.block_n}m{cfg.block_m}s{cfg.split_k}w{cfg.num_warps}st{cfg.num_stages}"
                              f"{'x' if cfg.x_unpacked else ''}")
            if args.tune and (args.budget is None or time.time() - t_start < args.budget):
                ref = quant_linear_reference(*xq, *wq, None, "int4", "int4", GROUP, "int8", 1, torch.float32)
                cand = tune_one(xq, wq, ref, M, N, (K - N_OUT) // GROUP)
                ok = [c for c in cand if c["us"] is not None and c["err"] is not None and c["err"] < 1e-5]
                best = min(ok, key=lambda c: c["us"]) if ok else None
                best_int8 = min((c for c in ok if not c["cfg"]["dot_fp8"]), key=lambda c: c["us"], default=None)
                best_fp8 = min((c for c in cand if c["cfg"]["dot_fp8"] and c["us"] is not None),
                               key=lambda c: c["us"], default=None)
                row["tuned_us"] = best["us"] if best else None
                row["x_bf16_tuned"] = base["bf16"] / best["us"] if best else None
                tuning.append(dict(N=N, K=K, M=M, best=best, best_int8=best_int8, best_fp8dot=best_fp8,
                                   candidates=cand))
                print(f"  tune N={N} K={K} M={M}: best {best and best['cfg']} {best and best['us']:.2f}us; "
                      f"fp8-dot best {best_fp8 and best_fp8['us']} (err {best_fp8 and best_fp8['err']})", flush=True)
            row["fp8_variants_us"] = base["fp8_variants"]
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            del x, w, xq, wq
            torch.cuda.empty_cache()
            if args.out:  # partial results survive a time-out
                with open(args.out + ".partial", "w") as f:
                    json.dump(dict(rows=rows, tuning=tuning), f)

    table = [{k: v for k, v in r.items() if k != "fp8_variants_us"} for r in rows]
    report("W4A4 GEMM (ours: GEMM alone, activation quantization excluded) vs torch bf16 / FP8 / INT8",
           table, args.out, extra=dict(full_rows=rows, tuning=tuning, note=__doc__))


if __name__ == "__main__":
    main()
