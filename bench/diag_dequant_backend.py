"""The dequant backend against the reference GEMM on the CPU: relative error and time per call on SmolLM2's
shapes (4,096 tokens), and the perplexity shift of a whole w8a8 SmolLM2 on the 128 tokens of
tests/test_checkpoint.py (the figures quoted in lowering/dequant.py, README and docs).

    python -m bench.diag_dequant_backend > docs/results/cpu/diag_dequant_backend.txt
"""
import copy
import time

import torch

import atom_compile
from atom_compile import quant
from atom_compile.data import BUNDLED_EVAL, read_text, tokenize, windows
from atom_compile.evaluate import perplexity
from atom_compile.lowering import relower
from atom_compile.lowering.dequant import DequantLinear
from atom_compile.ops import quant_linear_reference


def best_of(fn, n=3):
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


torch.manual_seed(0)
M = 4096
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
for N, K, g, n_out in [(3072, 576, 64, 128), (576, 1536, 128, 128), (960, 576, 64, 128), (576, 576, 64, 128)]:
    x, w = torch.randn(M, K), torch.randn(N, K) * 0.05
    xq = quant.quantize_rows(x, "int4", g, n_out, "int8", 0.9)
    wq = quant.quantize_rows(w, "int4", g, n_out, "int8", 0.85)
    fmts = ("int4", "int4", g, "int8", 1, torch.float32)
    lin = DequantLinear("t", wq, ("int4", g, "int8", 1), quantized_acts=True)
    ref, out = quant_linear_reference(*xq, *wq, None, *fmts), lin(*xq, *wq, None, *fmts)
    t_ref = best_of(lambda: quant_linear_reference(*xq, *wq, None, *fmts))
    t_deq = best_of(lambda: lin(*xq, *wq, None, *fmts))
    rel = ((out - ref).double().norm() / ref.double().norm()).item()
    print(f"GEMM M={M} N={N} K={K} g={g}: rel err {rel:.2e}, reference {t_ref * 1e3:.0f} ms, dequant "
          f"{t_deq * 1e3:.0f} ms ({t_ref / t_deq:.1f}x)")

model, tok = atom_compile.load_model("smollm2-135m")
q = atom_compile.compile(model, None, "w8a8", progress=False)
d = copy.deepcopy(q)
for gm in d.layers:
    relower(gm, "dequant")
ids = windows(tokenize(read_text(BUNDLED_EVAL), tok), 64, 2)  # 128 tokens
p_ref, p_deq = perplexity(q, ids, progress=False)["ppl"], perplexity(d, ids, progress=False)["ppl"]
print(f"w8a8 SmolLM2, 128 tokens: reference {p_ref:.4f}, dequant {p_deq:.4f} ({100 * (p_deq / p_ref - 1):+.2f}%)")
