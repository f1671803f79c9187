"""What power-of-two INT4 group scales (MX-style) would cost in accuracy, on the bundled SmolLM2 (CPU).

Why ask: with each group's scale a power of two, code * scale is exact in an FP8 e4m3 operand, so a W4A4 GEMM
could run as one FP8 GEMM with fp32 accumulation and no per-group rescale of the partial sums, the rescale that
bounds our large-M GEMM (docs/notes_gemm.md). This measures the price before anyone builds it: the INT4 group
scales of weights and activations are rounded up to the next power of two (``quant.group_scales`` patched for
``int4``; the INT8 outliers and the KV cache keep theirs), and the CLI's perplexity evaluation runs with and without.

    python -m bench.diag_pow2_scales --configs atom-w4a4-rtn,atom-w4a4 --max-tokens 8192 --out docs/results/pow2_scales.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

import torch
from tabulate import tabulate

from atom_compile import quant
from atom_compile.cli import main as cli_main


@contextlib.contextmanager
def pow2_int4_scales():
    """quant.group_scales rounds INT4 scales up to a power of two (so no value clips harder than before)."""
    original = quant.group_scales

    def rounded(x, fmt, group_size, clip, rows_per_scale=1):
        s = original(x, fmt, group_size, clip, rows_per_scale)
        return torch.where(s > 0, torch.exp2(torch.ceil(torch.log2(s))), s) if fmt == "int4" else s

    quant.group_scales = rounded
    try:
        yield
    finally:
        quant.group_scales = original


def evaluate(configs: str, max_tokens: int, calib_samples: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        rc = cli_main(["eval", "--configs", configs, "--calib-samples", str(calib_samples),
                       "--max-tokens", str(max_tokens), "--out", str(out)])
        if rc:
            raise SystemExit(rc)
        return json.loads(out.read_text())


def run(configs: str, max_tokens: int, calib_samples: int, out: str | None) -> None:
    rows = []
    for scales in ("float (Atom)", "power of two"):
        ctx = pow2_int4_scales() if scales == "power of two" else contextlib.nullcontext()
        with ctx:
            for r in evaluate(configs, max_tokens, calib_samples):
                rows.append({"config": r["config"], "group_scales": scales, "ppl": r["ppl"], "tokens": r["tokens"]})
    base = {r["config"]: r["ppl"] for r in rows if r["group_scales"] == "float (Atom)"}
    for r in rows:
        r["vs_float_scales"] = r["ppl"] / base[r["config"]]
    print(tabulate([list(r.values()) for r in rows], headers=list(rows[0]), tablefmt="github", floatfmt=".4g"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"command": "python -m bench.diag_pow2_scales", "calib_samples": calib_samples,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="atom-w4a4-rtn,atom-w4a4")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    run(a.configs, a.max_tokens, a.calib_samples, a.out)
