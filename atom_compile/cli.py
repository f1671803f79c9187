"""The ``atom-compile`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse_overrides(items: list[str]) -> dict:
    """``--set group_size=64 --set kv_bits=none`` -> {"group_size": 64, "kv_bits": None}."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--set expects KNOB=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        low = raw.strip().lower()
        if low in ("none", "null"):
            value = None
        elif low in ("true", "false"):
            value = low == "true"
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        out[key.strip().replace("-", "_")] = value
    return out


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="alias (smollm2-135m), .gguf file, HF directory, atom checkpoint directory or hub id")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--backend", choices=["reference", "triton", "dequant"], default=None,
                   help="kernels the lowering binds (default: triton on CUDA, the reference ops elsewhere; "
                        "dequant: the reference quantizers with float GEMMs over dequantized operands, "
                        "2-3x faster on a CPU, within 1e-6 of reference)")


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-file", default=None, help="calibration text (default: the bundled Wikipedia sample)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows (random starts, seed 0)")
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--set", action="append", metavar="KNOB=VALUE", default=[],
                   help="override an AtomConfig knob for every config, e.g. --set group_size=64")


def _dtype(args) -> torch.dtype:
    if args.dtype:
        return DTYPES[args.dtype]
    return torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32


def _load(args):
    from atom_compile.models import load_model

    return load_model(args.model, dtype=_dtype(args), device=args.device)


def _configs(names: list[str], args):
    """Every requested config, checked before anything slow happens."""
    from atom_compile.config import get_config

    overrides = _parse_overrides(args.set)
    return [get_config(name.strip(), **overrides) for name in names]


def _compile(model, tok, cfg, args, dump_dir=None):
    import atom_compile
    from atom_compile.data import BUNDLED_CALIB, read_text

    calib = [read_text(args.calib_file or BUNDLED_CALIB)] if cfg.needs_calibration else None
    return atom_compile.compile(
        model, calib, cfg, dump_dir=dump_dir, tokenizer=tok, calib_samples=args.calib_samples,
        calib_seqlen=args.calib_seqlen, backend=getattr(args, "backend", None),
    )


def _models(args, names: list[str]):
    """(name, compile-or-load thunk) per model to evaluate, and the tokenizer.

    A checkpoint directory (``atom-compile quantize --out DIR``) is evaluated as saved; otherwise the model
    is loaded once and compiled with each config.
    """
    from atom_compile.checkpoint import is_checkpoint, load

    if is_checkpoint(args.model):
        qmodel = load(args.model, device=args.device, backend=getattr(args, "backend", None))
        return [(f"checkpoint:{qmodel.atom_config.name}", lambda: qmodel)], qmodel.tokenizer
    configs = _configs(names, args)
    model, tok = _load(args)
    return [(cfg.name, lambda cfg=cfg: _compile(model, tok, cfg, args, _dump(args, cfg.name))) for cfg in configs], tok


def _dump(args, name):
    return str(Path(args.dump_dir) / name) if getattr(args, "dump_dir", None) else None


def cmd_eval(args) -> int:
    from atom_compile.data import BUNDLED_EVAL, read_text, tokenize, windows
    from atom_compile.evaluate import perplexity

    texts = args.text_file or [str(BUNDLED_EVAL)]
    for path in texts:
        read_text(path)  # a missing or empty file fails before the model loads
    makers, tok = _models(args, args.configs.split(","))
    evals = {}
    for path in texts:
        ids = tokenize(read_text(path), tok)
        if args.max_tokens:
            ids = ids[: args.max_tokens]
        evals[path] = windows(ids, args.seqlen)
    rows, records = [], []
    fp_ppl: dict[str, float] = {}
    for name, make in makers:
        start = time.perf_counter()
        qmodel = make()
        compile_s = time.perf_counter() - start
        for path, w in evals.items():
            r = perplexity(qmodel, w, batch_size=args.batch_size, device=args.device, desc=f"{name} {Path(path).name}")
            if name == "fp":
                fp_ppl[path] = r["ppl"]
            rec = {"config": name, "text": Path(path).name, "ppl": r["ppl"], "tokens": r["tokens"],
                   "seconds": r["seconds"], "compile_seconds": compile_s, "seqlen": args.seqlen,
                   "model": args.model, "overrides": _parse_overrides(args.set)}
            records.append(rec)
            if args.json:
                print(json.dumps(rec), flush=True)
            ratio = f"{r['ppl'] / fp_ppl[path]:.3f}" if path in fp_ppl else ""
            rows.append([name, Path(path).name, f"{r['ppl']:.3f}", ratio, r["tokens"], f"{compile_s:.1f}",
                         f"{r['seconds']:.1f}"])
        del qmodel
    if not args.json:
        print(tabulate(rows, headers=["config", "text", "perplexity", "x fp", "tokens", "compile s", "eval s"],
                       tablefmt="github"))
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=2))
    return 0


def cmd_generate(args) -> int:
    ((_, make),), _ = _models(args, [args.config])
    print(make().generate_text(args.prompt, args.max_new_tokens))
    return 0


def cmd_quantize(args) -> int:
    from atom_compile.checkpoint import save

    (cfg,) = _configs([args.config], args)
    model, tok = _load(args)
    qmodel = _compile(model, tok, cfg, args)
    sizes = save(qmodel, args.out, source=args.model)
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    print(tabulate([[args.out, cfg.name, mib(sizes["bytes"]), mib(sizes["fp16_bytes"]), mib(sizes["layer_bytes"]),
                     mib(sizes["fp16_layer_bytes"]), f"{sizes['fp16_layer_bytes'] / sizes['layer_bytes']:.2f}x"]],
                   headers=["checkpoint", "config", "file", "fp16 model", "decoder layers", "fp16 layers",
                            "layers smaller by"], tablefmt="github"))
    return 0


def cmd_lm_eval(args) -> int:
    import tempfile

    from atom_compile.lm_eval_adapter import evaluate, write_mc_tasks

    include = args.include_path
    tasks = [t for t in (args.tasks or "").split(",") if t]
    if args.mc_data:  # local multiple-choice JSONL files -> task YAMLs in a temporary include path
        include = include or tempfile.mkdtemp(prefix="atom-lm-eval-")
        tasks += write_mc_tasks(args.mc_data, include)
    if not tasks:
        raise ValueError("name --tasks, or give --mc-data DIR with *.jsonl multiple-choice files")
    ((name, make),), tok = _models(args, [args.config])
    qmodel = make()
    results = evaluate(qmodel, tok, tasks, include_path=include, limit=args.limit, batch_size=args.batch_size)
    rows = []
    for task, metrics in sorted(results["results"].items()):
        acc, acc_norm = metrics.get("acc,none"), metrics.get("acc_norm,none")
        rows.append({"config": name, "task": task, "acc": acc, "acc_norm": acc_norm,
                     "stderr": metrics.get("acc_stderr,none"), "n": results["n-samples"][task]["effective"]})
    accs = [r["acc"] for r in rows if r["acc"] is not None]
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(tabulate([list(r.values()) for r in rows], headers=list(rows[0].keys()), tablefmt="github", floatfmt=".4f"))
        print(f"mean acc over {len(accs)} tasks: {sum(accs) / len(accs):.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"config": name, "rows": rows, "mean_acc": sum(accs) / len(accs),
                                              "limit": args.limit}, indent=2))
    return 0


def cmd_ablate(args) -> int:
    from atom_compile.ablation import PAPER_LLAMA7B, ladder
    from atom_compile.data import BUNDLED_EVAL, read_text, tokenize, windows
    from atom_compile.evaluate import evaluate_against_reference

    steps = ladder(args.group_size, args.n_outliers, **_parse_overrides(args.set))
    if args.steps:
        unknown = set(args.steps.split(",")) - set(steps)
        if unknown:
            raise ValueError(f"unknown ablation steps {sorted(unknown)}; steps: {', '.join(steps)}")
        steps = {k: v for k, v in steps.items() if k in args.steps.split(",")}
    texts = args.text_file or [str(BUNDLED_EVAL)]
    for path in texts:
        read_text(path)
    model, tok = _load(args)
    evals = {}
    for path in texts:
        ids = tokenize(read_text(path), tok)
        evals[path] = windows(ids[: args.max_tokens] if args.max_tokens else ids, args.seqlen)
    compiled, compile_s = {}, {}
    args.set = []  # the overrides are already in the ladder's configs
    for name, cfg in steps.items():
        start = time.perf_counter()
        compiled[name] = _compile(model, tok, cfg, args)
        compile_s[name] = time.perf_counter() - start
    rows = []
    for path, w in evals.items():
        res = evaluate_against_reference(compiled, lambda x: model(x).logits, w, args.batch_size, args.device)
        for name in ["reference", *compiled]:
            r = res[name]
            step = "fp" if name == "reference" else name
            rows.append({"step": step, "text": Path(path).name, "ppl": r["ppl"], "x_fp": r["ppl"] / res["reference"]["ppl"],
                         "kl": r["kl"], "top1": r["top1_agreement"], "tokens": r["tokens"],
                         "compile_s": compile_s.get(name, 0.0), "eval_s": r["seconds"],
                         "paper_llama7b": PAPER_LLAMA7B.get(step)})
        if args.out:  # after every text, so a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps({
                "command": "atom-compile " + " ".join(sys.argv[1:]), "environment": _environment(args.device),
                "configs": {k: v.to_dict() for k, v in steps.items()}, "rows": rows}, indent=2))
    print(tabulate([list(r.values()) for r in rows], headers=list(rows[0].keys()), tablefmt="github", floatfmt=".4g"))
    if args.png:
        _ablation_chart(rows, args.png)
    return 0


def _environment(device: str = "cpu") -> dict:
    import datetime
    import platform

    import transformers

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if str(device).startswith("cuda") else f"cpu ({platform.processor() or platform.machine()})"}


def _ablation_chart(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = sorted({r["text"] for r in rows})
    steps = [r["step"] for r in rows if r["text"] == texts[0]]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(texts)
    for i, text in enumerate(texts):
        vals = [next(r["x_fp"] for r in rows if r["text"] == text and r["step"] == s) for s in steps]
        ax.bar([j + i * width for j in range(len(steps))], vals, width, label=text)
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(texts) - 1) / 2 for j in range(len(steps))], steps, rotation=30, ha="right")
    ax.set_ylabel("perplexity / fp perplexity (log scale)")
    ax.set_title("Atom ablation ladder")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atom-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="quantize with each config and print a perplexity table")
    _add_model_args(p)
    _add_calib_args(p)
    p.add_argument("--configs", default="fp,rtn-w4a4,atom-w4a4", help="comma-separated presets")
    p.add_argument("--text-file", action="append", help="evaluation text (repeatable; default: bundled sample)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate on the first N tokens of each text")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dump-dir", default=None, help="write per-pass graph dumps under DIR/<config>/")
    p.add_argument("--json", action="store_true", help="print one JSON object per config and text")
    p.add_argument("--out", default=None, help="also write all results to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="quantize and save a checkpoint (safetensors + JSON)")
    _add_model_args(p)
    _add_calib_args(p)
    p.add_argument("--config", default="atom-w4a4")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("lm-eval", help="zero-shot accuracy through lm-eval's harness (offline with local tasks)")
    _add_model_args(p)
    _add_calib_args(p)
    p.add_argument("--config", default="atom-w4a4")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="a directory of extra lm-eval task YAMLs")
    p.add_argument("--mc-data", default=None, help="a directory of {question, choices, label} *.jsonl files; "
                   "each becomes a task named local_<file>")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N examples per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None)
    p.set_defaults(func=cmd_lm_eval)

    p = sub.add_parser("ablate", help="the paper's ablation ladder (Table 4) on this model: table, JSON, PNG")
    _add_model_args(p)
    _add_calib_args(p)
    p.add_argument("--text-file", action="append", help="evaluation text (repeatable)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--n-outliers", type=int, default=128)
    p.add_argument("--steps", default=None, help="comma-separated subset of the ladder's steps")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default=None, help="JSON results")
    p.add_argument("--png", default=None, help="bar chart of perplexity / fp perplexity")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("generate", help="quantize, then continue a prompt")
    _add_model_args(p)
    _add_calib_args(p)
    p.add_argument("--config", default="atom-w4a4")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        notes = "".join(f"\n  {n}" for n in getattr(e, "__notes__", []))
        print(f"atom-compile: error: {e}{notes}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
