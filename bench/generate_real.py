"""The bundled SmolLM2-135M compiled on the GPU and decoding greedily, eager against CUDA-graph steps.

Compiles ``atom-w4a4`` (GPTQ, 4-bit KV) for the Triton backend in bf16 with 32 calibration samples of the bundled
Wikipedia sample, then times 64 new tokens after a prompt both ways and checks the tokens agree on four prompts.

    python -m bench.generate_real [--model smollm2-135m | PATH.gguf] > bench/results/generate_h100_smollm2_real.txt
"""

from __future__ import annotations

import argparse
import time

import torch

import atom_compile
from atom_compile import models
from atom_compile.data import BUNDLED_CALIB, read_text

PROMPTS = ["The capital of France is", "In 1905, Albert Einstein published", "The largest planet in the solar system"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a model spec or a GGUF file")
    a = ap.parse_args()
    model, tok = models.load_model(a.model, dtype=torch.bfloat16, device="cuda")
    q = atom_compile.compile(model, read_text(BUNDLED_CALIB), "atom-w4a4", tokenizer=tok, calib_samples=32,
                             progress=False)
    print("capture:", q.can_capture_decode(), "| kernel table:",
          sorted({r[2] for r in q.layers[0].meta["atom.kernel_table"]}))
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids.cuda()
    outs = {}
    for graph in (False, True):
        q.generate(ids, 8, cuda_graph=graph)
        torch.cuda.synchronize()
        start = time.perf_counter()
        outs[graph] = q.generate(ids, 64, cuda_graph=graph)
        torch.cuda.synchronize()
        print(f"cuda_graph={graph}: {time.perf_counter() - start:.3f} s for 64 tokens:",
              repr(tok.decode(outs[graph][0, ids.shape[1]:])))
    print("graph tokens == eager tokens:", torch.equal(outs[False], outs[True]))
    for p in PROMPTS:
        i = tok(p, return_tensors="pt").input_ids.cuda()
        eager, graphed = q.generate(i, 24, cuda_graph=False), q.generate(i, 24, cuda_graph=True)
        print(torch.equal(eager, graphed), repr(tok.decode(graphed[0, i.shape[1]:])))


if __name__ == "__main__":
    main()
