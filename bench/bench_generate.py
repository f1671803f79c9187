"""Text generation end to end on the GPU: the compiled model decoding eagerly and from a CUDA graph, against
transformers' bf16 model (eager ``generate``).

A SmolLM2-135M-shaped Llama (30 layers, hidden 576, 9 query / 3 KV heads) with random weights (speed only;
the bundled model's accuracy is measured by ``bench.gpu_ppl``), compiled with the ``atom-w4a4-rtn`` preset for
the Triton backend, in bf16. Greedy decoding, a 32-token prompt, 128 new tokens per sequence, at batch 1 and 16.
Per decode step: (time for 128 new tokens - time for 8) / 120, so the prefill and the one-off graph capture
drop out; tokens/s: the whole ``generate`` call.

    python -m bench.bench_generate --out bench/results/generate_h100.json
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import atom_compile
from bench.common import report

PROMPT, NEW, SHORT = 32, 128, 8


def smollm2_shaped() -> LlamaConfig:
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                       rope_theta=100000.0, tie_word_embeddings=True)


def seconds(fn, reps: int = 3) -> float:
    """Median wall time of ``fn()`` (synchronized), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run(out: str | None) -> None:
    torch.manual_seed(0)
    hf = LlamaForCausalLM(smollm2_shaped()).eval().to("cuda", torch.bfloat16)
    calib = torch.randint(0, 49152, (4, 128), device="cuda")
    q = atom_compile.compile(hf, calib, "atom-w4a4-rtn", progress=False, backend="triton")
    assert q.can_capture_decode() is None, q.can_capture_decode()
    rows = []
    for B in (1, 16):
        ids = torch.randint(0, 49152, (B, PROMPT), device="cuda")
        runs = {
            "transformers bf16, eager": lambda n, ids=ids: hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=0),
            "atom W4A4 + KV4, eager": lambda n, ids=ids: q.generate(ids, n, cuda_graph=False),
            "atom W4A4 + KV4, CUDA graph": lambda n, ids=ids: q.generate(ids, n, cuda_graph=True),
        }
        same = torch.equal(q.generate(ids, 16, cuda_graph=False), q.generate(ids, 16, cuda_graph=True))
        for name, gen in runs.items():
            t_long = seconds(lambda gen=gen: gen(NEW))
            t_short = seconds(lambda gen=gen: gen(SHORT))
            step_ms = (t_long - t_short) / (NEW - SHORT) * 1e3
            rows.append({"model": name, "batch": B, "new_tokens": NEW, "generate_s": t_long,
                         "tokens_per_s": B * NEW / t_long, "ms_per_decode_step": step_ms,
                         "graph_tokens_equal_eager": same})
    base = {r["batch"]: r["ms_per_decode_step"] for r in rows if r["model"].startswith("transformers")}
    for r in rows:
        r["step_speedup_vs_transformers"] = base[r["batch"]] / r["ms_per_decode_step"]
    report("generate: SmolLM2-135M-shaped Llama (random weights), greedy, 32-token prompt", rows, out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    run(ap.parse_args().out)
