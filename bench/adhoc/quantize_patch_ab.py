"""The block quantizers of several revisions of runtime_kernels/quantize.py timed in one run, alternating (16k x
4096 bf16, Llama-7B's size, the block order from random outliers: 119 swapped positions; and an order with none).
Each argument is a git revision (read with ``git show REV:runtime_kernels/quantize.py``) or a path to a copy of the
file. The comparisons behind docs/performance.md's "How the patch went from 85 to 74 us":

    PYTHONPATH=. python bench/adhoc/quantize_patch_ab.py 3867e14 29c6744 440d8eb 874b6a1 \\
        --out bench/adhoc/quantize_patch_ab_h100.json

3867e14: the per-position patch; 29c6744: the table patch (outlier load before it); 440d8eb: + the sum of squares
as an FMA; 874b6a1: + a padded group's scale dividing 1. Revisions whose plan_blocks takes runs of 8 (chunk orders,
``channel_order="chunks"``) are also timed on a chunk order (the library's current
one: outputs made before 4bab474 timed its earlier placement, each run over both half groups; since then lane pairs).
"""

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

import torch

from atom_compile.passes.outlier_analysis import block_channel_order, chunk_channel_order
from bench.bench_quantize import CLIP, EPS, _rows
from bench.common import bench_us, copy_bandwidth_gbs, report


def load(rev: str):
    src = open(rev).read() if os.path.isfile(rev) else subprocess.run(
        ["git", "show", f"{rev}:runtime_kernels/quantize.py"], capture_output=True, text=True, check=True).stdout
    pkg = "atom_compile.runtime_kernels"  # (the copy's relative imports made absolute)
    src = re.sub(r"^from \.(\w*) import", lambda m: f"from {pkg}{'.' + m.group(1) if m.group(1) else ''} import", src,
                 flags=re.M)
    path = os.path.join(tempfile.mkdtemp(), f"quantize_{os.path.basename(rev).replace('.', '_')}.py")
    open(path, "w").write(src)
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("revs", nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--chunk-units", default="16", help="run lengths of the chunk orders timed, e.g. 16,32")
    args = ap.parse_args()
    M, K, g, n_out = 16384, 4096, 128, 128
    x = _rows(M, K, "cuda", 0)
    w = (torch.rand(K, device="cuda") + 0.5).to(torch.bfloat16)
    perm = block_channel_order(torch.randperm(K, generator=torch.Generator().manual_seed(0)), n_out, g).cuda()
    ident = torch.arange(K, device="cuda")
    units = [int(u) for u in args.chunk_units.split(",")]
    chunks = {u: chunk_channel_order(torch.randperm(K, generator=torch.Generator().manual_seed(0)), n_out, g,
                                     unit=u).cuda() for u in units}
    qa = ("int4", g, n_out, "int8", CLIP)
    copy = copy_bandwidth_gbs(1 << 30)
    nbytes = M * K * 2 + M * (K - n_out) // 2 + M * (K - n_out) // g * 4 + M * n_out + M * 4
    mods = {rev: load(rev) for rev in args.revs}
    rows = []
    for rnd in range(args.rounds):
        for rev, q in mods.items():
            p3, p0 = q.plan_blocks(perm, n_out, g, max_swapped=g), q.plan_blocks(ident, n_out, g)
            cases = [("rms_norm_quant, block order", lambda: q.rms_norm_quant(x, w, EPS, p3, *qa)),
                     ("rms_norm_quant, no swap", lambda: q.rms_norm_quant(x, w, EPS, p0, *qa)),
                     ("gather_quant, block order", lambda: q.gather_quant(x, p3, *qa)),
                     ("gather_quant, no swap", lambda: q.gather_quant(x, p0, *qa))]
            for u, order in chunks.items():
                pc = q.plan_blocks(order, n_out, g)  # (None before the revisions that take runs of 8)
                if pc is not None:
                    name = "chunk order" + ("" if u == 16 else f", runs of {u}")
                    cases += [(f"rms_norm_quant, {name}", lambda pc=pc: q.rms_norm_quant(x, w, EPS, pc, *qa)),
                              (f"gather_quant, {name}", lambda pc=pc: q.gather_quant(x, pc, *qa))]
            for name, fn in cases:
                us = bench_us(fn)
                pct = 100 * nbytes / (us * 1e-6) / 1e9 / copy
                rows.append(dict(round=rnd, rev=os.path.basename(rev), kernel=name, us=us, pct_copy=pct))
    report(f"Block quantizer revisions, 16k x {K} bf16, alternating; copy {copy:.0f} GB/s", rows, args.out,
           extra={"copy_bandwidth_gbs": copy})


if __name__ == "__main__":
    main()
