"""Fused activation quantizers (runtime_kernels/quantize.py) on a CUDA device: GB/s against the device's copy
bandwidth, and the torch reference op for comparison.

    python -m bench.bench_quantize --out bench/results/quantize_h100.json
    python -m bench.bench_quantize --quick            # a few seconds
    python -m bench.bench_quantize --sweep            # also time launch configurations

Bytes are counted from the formats: the input rows read once (bf16), the weight and the permutation once,
the packed codes (K_normal / 2 bytes a row), the fp32 group scales, the INT8 outliers and their fp32 scale
written once. Every kernel is checked against the reference op on the GPU before it is timed.
"""

from __future__ import annotations

import argparse

import torch

from atom_compile import ops, quant
from atom_compile.passes.outlier_analysis import block_channel_order, chunk_channel_order
from atom_compile.runtime_kernels.quantize import gather_quant, plan_blocks, rms_norm_quant, silu_mul_quant
from bench.common import bench_us, copy_bandwidth_gbs, report

CLIP = 0.9
EPS = 1e-5


def _rows(M, K, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, K, device=device, generator=g) * 1.5 + 0.1
    x[:, torch.randperm(K, device=device, generator=g)[: K // 64]] *= 30.0  # outlier channels
    return x.to(torch.bfloat16)


CHECK_ROWS = 1024


def _cpu_rows(*tensors):
    """The first CHECK_ROWS rows on the CPU (1-D tensors, weights and perms, whole)."""
    return [t[:CHECK_ROWS].cpu() if t.dim() > 1 else t.cpu() for t in tensors]


def _check(out, ref, group_size, exact):
    """The bound stated in runtime_kernels/quantize.py (bit-exact for gather_quant), against the reference op
    run on the CPU (the definition: torch's CUDA division by a Python scalar is a multiply by its reciprocal)."""
    out = _cpu_rows(*out)
    q, s, o, os_ = out
    rq, rs, ro, ros = ref
    if exact:
        for a, b in zip(out, ref):
            assert torch.equal(a, b), "not bit-exact"
        return "bit-exact"
    worst = 0.0
    for a, b in ((quant.unpack_nibbles(q, group_size), quant.unpack_nibbles(rq, group_size)), (o.int(), ro.int())):
        d = (a - b).abs()
        assert int(d.max()) <= 1, f"a code off by {int(d.max())}"
        worst = max(worst, float((d > 0).float().mean()))
    assert worst < 1e-3, f"{worst:.2%} of the codes differ"
    for a, b in ((s, rs), (os_, ros)):
        rel = float(((a - b).abs() / b.abs().clamp_min(1e-30)).max())
        assert rel <= 2.0**-7, f"scale rel err {rel}"
        assert int((a != b).sum()) <= max(1, a.numel() // 1000), "too many scales not bit-equal"
    return f"codes off by 1: {worst:.1e}"


def _bytes(M, K, n_out, g, inputs: int, extra_in: int) -> int:
    Kn = K - n_out
    read = inputs * M * K * 2 + extra_in
    written = M * Kn // 2 + M * (Kn // g) * 4 + M * n_out + M * 4
    return read + written


def _time(fn, ref_fn, cpu_ref, nbytes, copy_gbs, label, shape, check, sweep_configs=()):
    """fn: the kernel; ref_fn: the reference op on the GPU (timed only); cpu_ref: the reference on the CPU for
    the first CHECK_ROWS rows (what fn is checked against)."""
    out = fn()
    ref = cpu_ref()
    status = check(out, ref)
    us = bench_us(fn)
    try:
        ref_us = bench_us(ref_fn)
    except Exception:  # a reference that cannot be captured in a graph: time it eagerly
        ref_us = bench_us(ref_fn, graph=False)
    gbs = nbytes / (us * 1e-6) / 1e9
    rows = [dict(kernel=label, shape=shape, config="default", us=us, GBps=gbs, pct_copy=100 * gbs / copy_gbs,
                 ref_us=ref_us, speedup_vs_ref=ref_us / us, check=status)]
    for name, cfn in sweep_configs:
        check(cfn(), ref)
        cus = bench_us(cfn)
        cg = nbytes / (cus * 1e-6) / 1e9
        rows.append(dict(kernel=label, shape=shape, config=name, us=cus, GBps=cg, pct_copy=100 * cg / copy_gbs,
                         ref_us=ref_us, speedup_vs_ref=ref_us / cus, check="ok"))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="small shapes, a few seconds")
    ap.add_argument("--sweep", action="store_true", help="also time other launch configurations")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--outliers", type=int, default=128)
    ap.add_argument("--swap-fractions", default="",
                    help="also time the block kernel on orders with this fraction of positions swapped (e.g. 0.1,0.25)")
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "bench_quantize needs a CUDA device"
    dev = "cuda"
    M = 1024 if args.quick else args.tokens
    g, n_out = args.group_size, args.outliers
    copy_gbs = copy_bandwidth_gbs(1 << 28 if args.quick else 1 << 30)
    rows = []

    # --- RMSNorm + reorder + quantize (q/k/v and gate/up inputs)
    K = args.hidden
    x = _rows(M, K, dev, 0)
    w = (torch.rand(K, device=dev) + 0.5).to(torch.bfloat16)
    perm = torch.randperm(K, device=dev)
    qargs = ("int4", g, n_out, "int8", CLIP)
    sweep = [("one row per gather (pairs=False)", lambda: rms_norm_quant(x, w, EPS, perm, *qargs, pairs=False))]
    if args.sweep:
        sweep += [(f"rows={r},warps={nw}", (lambda r=r, nw=nw: rms_norm_quant(x, w, EPS, perm, *qargs,
                                                                             rows_per_program=r, num_warps=nw)))
                  for r in (2, 4, 8, 16, 32, 64) for nw in (4, 8, 16)]
    rows += _time(lambda: rms_norm_quant(x, w, EPS, perm, *qargs),
                  lambda: ops.rms_norm_quant_reference(x, w, EPS, perm, *qargs),
                  lambda: ops.rms_norm_quant_reference(*_cpu_rows(x, w), EPS, perm.cpu(), *qargs),
                  _bytes(M, K, n_out, g, 1, K * 2 + K * perm.element_size()), copy_gbs,
                  "rms_norm_quant", f"{M}x{K}", lambda o, r: _check(o, r, g, False), sweep)

    # --- gather + quantize (o_proj input)
    sweep = [("one row per gather (pairs=False)", lambda: gather_quant(x, perm, *qargs, pairs=False))]
    if args.sweep:
        sweep += [(f"rows={r},warps={nw}", (lambda r=r, nw=nw: gather_quant(x, perm, *qargs, rows_per_program=r,
                                                                           num_warps=nw)))
                  for r in (2, 4, 8, 16, 32, 64) for nw in (4, 8, 16)]
    rows += _time(lambda: gather_quant(x, perm, *qargs), lambda: ops.gather_quant_reference(x, perm, *qargs),
                  lambda: ops.gather_quant_reference(*_cpu_rows(x, perm), *qargs),
                  _bytes(M, K, n_out, g, 1, K * perm.element_size()), copy_gbs,
                  "gather_quant", f"{M}x{K}", lambda o, r: _check(o, r, g, True), sweep)

    # --- the same two with channel_order="blocks" and "chunks" (random outliers): the block kernel (BlockPlan):
    # groups loaded as runs (of g, or of 8 channels sorted by score), the swapped channels patched
    table = K * 2 + n_out * 4  # the run columns (int16) and the outlier indices, read once
    configs = [(f"rows={r},warps={nw},prefetch={pf}", r, nw, pf)
               for r, nw, pf in ((1, 2, False), (1, 4, False), (1, 8, False), (2, 4, False), (2, 4, True),
                                 (4, 4, False), (4, 4, True), (16, 4, True))]
    for kind, make_order in (("block", block_channel_order), ("chunk", chunk_channel_order)):
        bperm = make_order(torch.randperm(K, generator=torch.Generator().manual_seed(0)), n_out, g).to(dev)
        plan = plan_blocks(bperm, n_out, g)
        label = f"{kind} order, {plan.n_swapped} swapped channels"
        sweep_configs = configs if kind == "block" else []
        rows += _time(lambda: rms_norm_quant(x, w, EPS, plan, *qargs),
                      lambda: ops.rms_norm_quant_reference(x, w, EPS, bperm, *qargs),
                      lambda: ops.rms_norm_quant_reference(*_cpu_rows(x, w), EPS, bperm.cpu(), *qargs),
                      _bytes(M, K, n_out, g, 1, K * 2 + table), copy_gbs,
                      f"rms_norm_quant ({label})", f"{M}x{K}", lambda o, r: _check(o, r, g, False),
                      [(n, (lambda r=r, nw=nw, pf=pf: rms_norm_quant(x, w, EPS, plan, *qargs, rows_per_program=r,
                                                                     num_warps=nw, prefetch=pf)))
                       for n, r, nw, pf in sweep_configs])
        rows += _time(lambda: gather_quant(x, plan, *qargs), lambda: ops.gather_quant_reference(x, bperm, *qargs),
                      lambda: ops.gather_quant_reference(*_cpu_rows(x, bperm), *qargs),
                      _bytes(M, K, n_out, g, 1, table), copy_gbs,
                      f"gather_quant ({label})", f"{M}x{K}", lambda o, r: _check(o, r, g, True),
                      [(n, (lambda r=r, nw=nw, pf=pf: gather_quant(x, plan, *qargs, rows_per_program=r, num_warps=nw,
                                                                   prefetch=pf)))
                       for n, r, nw, pf in sweep_configs])

    # --- the block kernel's cost against the fraction of swapped positions (synthetic orders: blocks in place, a
    # fraction of the normal positions exchanging channels at random; plan_blocks with no threshold)
    for frac in [float(f) for f in args.swap_fractions.split(",") if f]:
        gen = torch.Generator().manual_seed(1)
        sperm = torch.arange(K)
        Kn = K - n_out
        pos = torch.randperm(Kn, generator=gen)[: int(frac * Kn)]
        sperm[pos] = sperm[pos[torch.randperm(pos.numel(), generator=gen)]]
        sperm = sperm.to(dev)
        splan = plan_blocks(sperm, n_out, g, max_swapped=g)
        slabel = f"block kernel, {splan.n_swapped / Kn:.0%} of positions swapped"
        rows += _time(lambda: rms_norm_quant(x, w, EPS, splan, *qargs),
                      lambda: ops.rms_norm_quant_reference(x, w, EPS, sperm, *qargs),
                      lambda: ops.rms_norm_quant_reference(*_cpu_rows(x, w), EPS, sperm.cpu(), *qargs),
                      _bytes(M, K, n_out, g, 1, K * 2 + table), copy_gbs,
                      f"rms_norm_quant ({slabel})", f"{M}x{K}", lambda o, r: _check(o, r, g, False))
        rows += _time(lambda: gather_quant(x, splan, *qargs), lambda: ops.gather_quant_reference(x, sperm, *qargs),
                      lambda: ops.gather_quant_reference(*_cpu_rows(x, sperm), *qargs),
                      _bytes(M, K, n_out, g, 1, table), copy_gbs,
                      f"gather_quant ({slabel})", f"{M}x{K}", lambda o, r: _check(o, r, g, True))
    del x

    # --- SiLU(gate) * up + quantize (down_proj input), at the hidden and the intermediate size
    for K in (args.hidden, args.intermediate):
        gate = _rows(M, K, dev, 1) * 0.25
        up = _rows(M, K, dev, 2)
        sweep = []
        if args.sweep:
            sweep = [(f"groups/step={gb},warps={nw}",
                      (lambda gb=gb, nw=nw: silu_mul_quant(gate, up, *qargs, groups_per_step=gb, num_warps=nw)))
                     for gb in (4, 8, 16, 32) for nw in (2, 4, 8)]
            sweep += [(f"chunks={c}", (lambda c=c: silu_mul_quant(gate, up, *qargs, chunks=c))) for c in (1, 2, 4, 8, 16)]
        rows += _time(lambda: silu_mul_quant(gate, up, *qargs),
                      lambda: ops.silu_mul_quant_reference(gate, up, *qargs),
                      lambda: ops.silu_mul_quant_reference(*_cpu_rows(gate, up), *qargs),
                      _bytes(M, K, n_out, g, 2, 0), copy_gbs, "silu_mul_quant", f"{M}x{K}",
                      lambda o, r: _check(o, r, g, False), sweep)
        del gate, up

    report(f"Fused activation quantizers (bf16 in, int4 g{g} + {n_out} int8 outliers); copy bandwidth "
           f"{copy_gbs:.0f} GB/s (read + write)", rows, args.out,
           extra={"copy_bandwidth_gbs": copy_gbs, "tokens": M, "clip": CLIP})


if __name__ == "__main__":
    main()
