"""Executed SASS instructions of one kernel from an ncu source-page export, per warp and work item, by opcode.

    ncu --kernel-name regex:NAME --launch-skip 1 --launch-count 1 --section SourceCounters -o rep python ...
    ncu --import rep.ncu-rep --page source --print-source sass --csv > rep_sass.csv
    python -m bench.ncu_sass_counts rep_sass.csv --items 16384 --warps 4   (a .csv.gz too)

``--items``: the work items the launch covered (rows, for the quantizers), ``--warps``: warps per item.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--items", type=int, required=True)
    ap.add_argument("--warps", type=int, required=True)
    ap.add_argument("--elements", type=int, default=0, help="elements per item, for instructions per element")
    args = ap.parse_args(argv)
    rows = list(csv.reader((gzip.open if args.csv.endswith('.gz') else open)(args.csv, 'rt')))
    head = next(i for i, r in enumerate(rows) if "Instructions Executed" in r)
    hdr = rows[head]
    n_col, src_col = hdr.index("Instructions Executed"), hdr.index("Source")
    per = args.items * args.warps
    ops, total = collections.Counter(), 0.0
    for r in rows[head + 1:]:
        n = int(r[n_col] or 0) / per
        toks = r[src_col].split()
        if not toks:
            continue
        op = (toks[1] if toks[0].startswith("@") else toks[0]).split(".")[0]
        ops[op] += n
        total += n
    print(f"{args.csv}: {total:.0f} warp instructions per warp and item")
    if args.elements:
        print(f"  = {total * 32 * args.warps / args.elements:.1f} thread instructions per element")
    print("  " + ", ".join(f"{op} {n:.0f}" for op, n in ops.most_common(16)))


if __name__ == "__main__":
    main()
