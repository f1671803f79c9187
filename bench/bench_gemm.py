"""W4A4 GEMM (runtime_kernels/w4a4_gemm.py) against torch bf16, FP8 and INT8 matrix products on the GPU.

For each (N, K) and M: check ours against ``quant_linear_reference`` on the GPU (max relative error over
fp32 and bf16 outputs), then time, each under CUDA graphs (``bench.common.bench_us``, median):

- bf16:  ``x @ w.T`` (cuBLAS)
- fp8:   ``torch._scaled_mm`` with e4m3 operands, rowwise scales (and tensorwise scales with fast
         accumulation; the faster of the two is the "fp8" column)
- int8:  ``torch._int_mm`` with B column-major (needs M > 16: shown as '-' at M = 16)
- ours:  ``w4a4_gemm`` on already-quantized activations: the GEMM alone, activation quantization excluded.
         From ``BLOCKSCALED_MIN_M`` tokens on that is cuBLAS's block-scaled FP8 GEMM on operands our Triton
         kernels make per call (runtime_kernels/fp8_blockscaled.py); the row then also times our Triton
         GEMM kernel on the same size (``triton_kernel_us``).

K counts all input channels: K = 4096 is 3968 int4 channels (31 groups of 128) + 128 int8 outliers.
TFLOP/s = 2 M N K / time for every column. Inputs rotate over several copies when one set fits in L2.

    python -m bench.bench_gemm --out bench/results/gemm_h100.json [--quick] [--no-autotune]

By default ``w4a4_gemm`` autotunes: the first call of each size times ``candidates`` (compiled in parallel
first) and keeps the fastest; the JSON records every candidate's time. ``--no-autotune`` uses
``pick_config``'s table instead.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def time_ours(xq, wq, cfg=None, reps=50, x16=False) -> float:
    """Median us of our GEMM; x16: the activations arrive unpacked (int8 16 * code, as the quantizers write
    them in the compiled model), else packed nibbles."""
    pw0 = wk.prepare_weight(*wq, GROUP)
    k = n_sets(weight_bytes(pw0))
    pws = [pw0] + [wk.prepare_weight(*(t.clone() for t in wq), GROUP) for _ in range(k - 1)]
    outs = [torch.empty(xq[0].shape[0], pw0.N, dtype=torch.bfloat16, device="cuda") for _ in range(k)]
    xin = (wk.unpack_activations(xq[0], GROUP), *xq[1:]) if x16 else xq
    large = cfg is None and wk.takes_blockscaled_path(xq[0].shape[0], pw0.N, GROUP, torch.bfloat16, xq[0].device)
    if large:  # (cuBLAS writes its own output: an out= would cost a copy that the compiled model never makes)
        outs = [None] * k
    fns = [lambda p=p, o=o: wk.w4a4_gemm(*xin, p, None, torch.bfloat16, config=cfg, out=o, x_unpacked=x16)
           for p, o in zip(pws, outs)]
    if x16:
        fns[0]()  # (the first call of a size autotunes, outside the timed graph)
    return bench_us(fns[0], rotate=fns, reps=reps)


def time_operands(xq, wq) -> dict:
    """The two operand passes of the cuBLAS large-M path, timed alone (included in ours_us): the weight unpacked
    to e4m3 (every call) and the packed activations turned into the e4m3 operand with transposed scales."""
    pw = wk.prepare_weight(*wq, GROUP)
    fb = wk.fp8_blockscaled
    return dict(weight_operand_us=bench_us(lambda: fb.weight_operand(pw.wq, pw.wo, pw.n_out)),
                act_operand_us=bench_us(lambda: fb.blockscaled_operands(*xq, x_unpacked=False)))


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
    wk.w4a4_gemm(*xq, pw, None, torch.bfloat16)  # the first call of a size autotunes (when enabled)
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


def precompile(jobs, workers: int, deadline: float = 180.0) -> None:
    t = time.time()
    import multiprocessing as mp

    from concurrent.futures import wait

    ex = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    futs = [ex.submit(_compile_job, j) for j in jobs]
    done, pending = wait(futs, timeout=deadline)
    errs = [f.result() for f in done if f.result()]
    errs += [f"{asdict(j[3]) if j[3] else None} M={j[0]} N={j[1]} K={j[2]}: not done in {deadline}s"
             for f, j in zip(futs, jobs) if f in pending]
    ex.shutdown(wait=False, cancel_futures=True)
    if pending:  # a hung compile or kernel: stop the workers (this process's own children)
        for proc in list(getattr(ex, "_processes", {}).values()):
            proc.terminate()
    print(f"precompiled {len(jobs)} jobs in {time.time() - t:.0f}s; {len(errs)} failed", flush=True)
    for e in errs[:20]:
        print("  compile failure:", e)


def _short(c) -> str:
    return (f"n{c.block_n}m{c.block_m}s{c.split_k}w{c.num_warps}st{c.num_stages}{'x' if c.x_unpacked else ''}"
            f"{'o' if c.out_split else ''}{'ws' if c.ws else ''}{'f8' if c.dot_fp8 else ''}{'mg' if c.magic else ''}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="two shapes, three M")
    ap.add_argument("--no-autotune", action="store_true", help="use pick_config's table instead of timing the "
                    "candidates on the first call of each size")
    ap.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,12288x4096 (N x K)")
    ap.add_argument("--ms", default=None, help="e.g. 16,4096")
    ap.add_argument("--profile", default=None, help="N,K,M: just run one size 3 times (for ncu), with --cfg")
    ap.add_argument("--cfg", default="", help="Config fields for --profile, e.g. block_n=128,block_m=64,ws=1")
    ap.add_argument("--x16", action="store_true", help="also time ours with the activations given unpacked (int8 "
                    "16 * code: what the compiled model's quantizers write), autotuned separately")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gemm needs a CUDA device")
    if args.profile:
        N, K, M = (int(v) for v in args.profile.split(","))
        fields = {k: int(v) for k, v in (kv.split("=") for kv in args.cfg.split(",") if kv)}
        cfg = wk.Config(**{k: (bool(v) if isinstance(getattr(wk.Config, k), bool) else v) for k, v in fields.items()})
        _, _, xq, wq = make_problem(M, N, K)
        pw = wk.prepare_weight(*wq, GROUP)
        for _ in range(3):
            wk.w4a4_gemm(*xq, pw, None, torch.bfloat16, config=cfg)
        torch.cuda.synchronize()
        print("profiled", N, K, M, cfg)
        return
    shapes = SHAPES[:2] if args.quick else SHAPES
    ms = [16, 256, 4096] if args.quick else MS
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]

    autotune = not args.no_autotune
    wk.set_autotune(autotune)
    jobs = [(M, N, K, c) for N, K in shapes for M in ms
            for c in (wk.candidates(M, N, (K - N_OUT) // GROUP) if autotune else [None])]
    if args.x16 and autotune:  # (the x_unpacked twins compile other kernels)
        jobs += [(M, N, K, dataclasses.replace(c, x_unpacked=True)) for M, N, K, c in jobs]
    precompile(jobs, args.workers)

    rows, tuning = [], []
    for N, K in shapes:
        for M in ms:
            x, w, xq, wq = make_problem(M, N, K)
            n_log = len(wk.AUTOTUNE_LOG)
            try:
                err = verify(xq, wq)  # (its first call autotunes this size)
            except Exception as e:  # noqa: BLE001  (recorded, and the row is marked failed)
                print(f"VERIFY FAILED N={N} K={K} M={M}: {e!r}"[:500], flush=True)
                err = float("nan")
            base = time_baselines(x, w)
            key = (0, wk._m_bucket(M), N, (K - N_OUT) // GROUP, GROUP, N_OUT, False)
            cfg = wk._TUNED.get(key) or wk.pick_config(M, N, (K - N_OUT) // GROUP)
            try:
                ours = time_ours(xq, wq)
            except Exception as e:  # noqa: BLE001
                print(f"OURS FAILED N={N} K={K} M={M}: {e!r}"[:500], flush=True)
                ours = float("nan")
            large = wk.takes_blockscaled_path(M, N, GROUP, torch.bfloat16, xq[0].device)
            triton_us = None
            if large:  # ours above ran cuBLAS's block-scaled FP8 GEMM: our Triton kernel on the same size too
                wk.set_large_m_backend("triton")
                try:
                    triton_us = time_ours(xq, wq)
                except Exception as e:  # noqa: BLE001
                    print(f"TRITON KERNEL FAILED N={N} K={K} M={M}: {e!r}"[:500], flush=True)
                    triton_us = float("nan")
                finally:
                    wk.set_large_m_backend("cublas_fp8")
            ours_x16 = None
            if args.x16:
                try:
                    ours_x16 = time_ours(xq, wq, x16=True)
                except Exception as e:  # noqa: BLE001
                    print(f"OURS x16 FAILED N={N} K={K} M={M}: {e!r}"[:500], flush=True)
                    ours_x16 = float("nan")
            flop = 2 * M * N * K

            def tf(us):
                return None if us is None else flop / us / 1e6

            row = dict(N=N, K=K, M=M, bf16_us=base["bf16"], fp8_us=base["fp8"], int8_us=base["int8"], ours_us=ours,
                       ours_tflops=tf(ours), bf16_tflops=tf(base["bf16"]),
                       x_bf16=base["bf16"] / ours, x_fp8=None if base["fp8"] is None else base["fp8"] / ours,
                       x_int8=None if base["int8"] is None else base["int8"] / ours, max_rel_err=err,
                       config="cublas_fp8 (block-scaled)" if large else _short(cfg))
            if large:
                row.update(triton_kernel_us=triton_us, triton_kernel_x_bf16=base["bf16"] / triton_us,
                           triton_kernel_config=_short(cfg), **time_operands(xq, wq))
            if args.x16:
                key16 = key + (True,)
                cfg16 = wk._TUNED.get(key16) or dataclasses.replace(wk.pick_config(M, N, (K - N_OUT) // GROUP),
                                                                    x_unpacked=True)
                row.update(ours_x16_us=ours_x16, x16_x_bf16=base["bf16"] / ours_x16, x16_config=_short(cfg16))
            for entry in wk.AUTOTUNE_LOG[n_log:]:
                tuning.append(dict(N=N, K=K, M=M, best=asdict(entry["best"]),
                                   candidates=[dict(cfg=asdict(c), us=t, error=e) for c, t, e in entry["times"]]))
                print("  autotune:", "; ".join(f"{_short(c)} {t:.1f}" if t else f"{_short(c)} {e}"
                                              for c, t, e in entry["times"]), flush=True)
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
