"""The compiled SmolLM2 on the GPU (Triton kernels) against the CPU reference path, on the same windows.

The quantized layers come from a checkpoint written on the CPU (``atom-compile quantize``), so both sides
run identical codes, scales and orders; only the backend differs. The embeddings and LM head are rebuilt
from the source GGUF (the checkpoint's copy of them is left out to keep the transfer small).

    python -m bench.gpu_ppl --layers DIR --gguf FILE --windows FILE.safetensors --cpu-reference --out CPU.json  # CPU
    python -m bench.gpu_ppl --layers DIR --gguf FILE --windows FILE.safetensors --cpu-ppl X --out OUT.json      # GPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from atom_compile import models
from atom_compile.checkpoint import CONFIG, GRAPHS, graph_from_json
from atom_compile.config import AtomConfig
from atom_compile.evaluate import perplexity
from atom_compile.lowering import lower
from atom_compile.models import ArchInfo
from atom_compile.passes import FuseSiblingGemms, MergeSlicedHeadOps, PassContext
from atom_compile.runtime import AtomForCausalLM
from bench.common import environment


def build(layers_dir: Path, hf_model, backend: str, dtype: torch.dtype, device: str = "cuda",
          fuse_siblings: bool = False) -> AtomForCausalLM:
    """``fuse_siblings``: run FuseSiblingGemms and MergeSlicedHeadOps on graphs saved before those passes existed
    (bit-identical results on the reference ops; one GEMM each for q/k/v and gate/up, one RoPE and one Hadamard
    launch for q and k on the kernels)."""
    meta = json.loads((layers_dir / CONFIG).read_text())
    graphs = json.loads((layers_dir / GRAPHS).read_text())["layers"]
    tensors = load_file(str(layers_dir / "layers.safetensors"))
    layers = []
    for i, g in enumerate(graphs):
        root = torch.nn.Module()
        for key, t in tensors.items():
            if key.startswith(f"layers.{i}."):
                t = t.to(dtype) if t.is_floating_point() and t.dtype == torch.float32 and key.endswith(("weight",)) else t
                root.register_buffer(key[len(f"layers.{i}."):], t)
        gm = graph_from_json(g, root).to(device)
        for n in gm.graph.nodes:  # the graph was built for float32 activations; run it in ``dtype``
            n.args = tuple(dtype if a is torch.float32 else a for a in n.args)
        gm.recompile()
        if fuse_siblings:  # (a no-op on graphs that have them already)
            ctx = PassContext(AtomConfig.from_dict(meta["atom_config"]), ArchInfo(**meta["arch"]))
            for p in (FuseSiblingGemms, MergeSlicedHeadOps):
                gm = p(ctx).call(gm).graph_module
        layers.append(lower(gm, backend))
    hf = dict(meta["hf_config"])
    cfg = AutoConfig.for_model(hf.pop("model_type"), **hf)
    emb = hf_model.model.embed_tokens.weight.detach().to(dtype)
    return AtomForCausalLM(ArchInfo(**meta["arch"]), layers, emb, hf_model.model.norm.weight.detach().to(dtype), emb,
                           LlamaRotaryEmbedding(cfg).to(device), AtomConfig.from_dict(meta["atom_config"]),
                           hf_config=meta["hf_config"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--windows", required=True)
    ap.add_argument("--cpu-ppl", type=float, default=None, help="the CPU reference path's perplexity")
    ap.add_argument("--cpu-reference", action="store_true",
                    help="compute the CPU reference path's perplexity (run on the CPU first; pass it as --cpu-ppl)")
    ap.add_argument("--fuse-siblings", action="store_true",
                    help="apply FuseSiblingGemms and MergeSlicedHeadOps to a checkpoint written before them")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    windows = load_file(a.windows)["windows"]
    if a.cpu_reference:
        hf_model, _ = models.load_model(a.gguf, dtype=torch.float32, device="cpu")
        start = time.perf_counter()
        qm = build(Path(a.layers), hf_model, "reference", torch.float32, device="cpu", fuse_siblings=a.fuse_siblings)
        r = perplexity(qm, windows, batch_size=8, device="cpu", progress=True)
        result = {"environment": environment(), "backend": "reference", "device": "cpu", "ppl": r["ppl"],
                  "tokens": r["tokens"], "seconds": time.perf_counter() - start}
        print(json.dumps(result, indent=2))
        if a.out:
            Path(a.out).write_text(json.dumps(result, indent=2))
        return
    hf_model, _ = models.load_model(a.gguf, dtype=torch.float32, device="cuda")
    rows = []
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float32), ("triton", torch.bfloat16)):
        start = time.perf_counter()
        qm = build(Path(a.layers), hf_model, backend, dtype, fuse_siblings=a.fuse_siblings)
        r = perplexity(qm, windows, batch_size=8, device="cuda", progress=False)
        rows.append({"backend": backend, "dtype": str(dtype).removeprefix("torch."), "ppl": r["ppl"],
                     "fused_siblings": a.fuse_siblings,
                     "vs_cpu_reference": r["ppl"] / a.cpu_ppl - 1 if a.cpu_ppl else None, "tokens": r["tokens"],
                     "seconds": time.perf_counter() - start})
        print(rows[-1], flush=True)
    fp = perplexity(lambda x: hf_model(x).logits, windows, batch_size=8, device="cuda", progress=False)["ppl"]
    result = {"environment": environment(), "cpu_reference_ppl": a.cpu_ppl, "fp32_model_ppl_gpu": fp, "rows": rows}
    print(json.dumps(result, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
