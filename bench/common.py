"""Shared benchmark plumbing: timing under CUDA graphs, the environment header, tables and JSON results.

Every benchmark prints a tabulate table and writes JSON with the device, the versions, the date and the
medians, so that the numbers quoted in docs/performance.md can be traced to a committed file.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
from pathlib import Path

import torch
from tabulate import tabulate


def environment() -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, sm=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1))
        try:
            import subprocess

            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # nvidia-smi missing: the driver version is just not recorded
            env["driver"] = None
    else:
        env["device"] = "cpu"
    return env


def bench_us(fn, warmup: int = 10, reps: int = 50, graph: bool = True, rotate: list | None = None) -> float:
    """Median microseconds of one call of ``fn``.

    With ``graph=True`` the call is captured in a CUDA graph (20 calls per replay, to amortize the replay
    launch) and replays are timed with CUDA events: launch gaps of the Python side stay out of the numbers,
    as in a serving engine's decode loop. ``rotate``: callables run round-robin instead of ``fn`` so that
    inputs larger than L2 are not re-read from cache.
    """
    fns = rotate or [fn]
    for _ in range(warmup):
        for f in fns:
            f()
    torch.cuda.synchronize()
    per_replay = 20
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(per_replay):
                fns[i % len(fns)]()
        run = g.replay
    else:
        def run():
            for i in range(per_replay):
                fns[i % len(fns)]()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / per_replay)
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_()
    us = bench_us(lambda: b.copy_(a), graph=False, reps=20)
    return 2 * a.numel() / (us * 1e-6) / 1e9


def report(title: str, rows: list[dict], out: str | Path | None, extra: dict | None = None) -> None:
    """Print the table and write {environment, rows, extra} as JSON."""
    env = environment()
    print(f"\n{title}  [{env.get('device')}, torch {env['torch']}, triton {env['triton']}, {env['date']}]")
    if rows:
        print(tabulate([list(r.values()) for r in rows], headers=list(rows[0].keys()), tablefmt="github",
                       floatfmt=".3g"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"title": title, "environment": env, "rows": rows, **(extra or {})},
                                        indent=2))
