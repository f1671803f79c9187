"""Rounding-boundary flips on the CPU: w8a8 decode vs full forward in float32 and float64 (the figures in
the docstring of tests/test_kv_decode.py).  python bench/diag_cpu_flips_decode.py  (reads ../shared/data)"""
import copy, torch, atom_compile
from atom_compile.data import read_text, tokenize
model, tok = atom_compile.load_model("smollm2-135m")
ids = tokenize(read_text("../shared/data/enwiki_eval.txt")[:200_000], tok)
tokens = ids[1000:1048].unsqueeze(0)
for dt in (torch.float32, torch.float64):
    m = copy.deepcopy(model).to(dt)
    qm = atom_compile.compile(m, None, "w8a8", progress=False)
    a, b = tokens[:, :24], tokens[:, 24:48]
    full_a, full_b = qm(a), qm(b)
    cache = qm.new_cache(2, 32)
    qm(torch.cat([a[:, :20], b[:, :20]]), cache)
    step = qm(torch.cat([a[:, 20:21], b[:, 20:21]]), cache)
    print(dt, "a", (step[0]-full_a[0,20:21]).abs().max().item(), "b", (step[1]-full_b[0,20:21]).abs().max().item(), full_a.abs().max().item())
    # single sequence decode
    cache = qm.new_cache(1, 32)
    qm(a[:, :20], cache); s1 = qm(a[:, 20:21], cache)
    print(dt, "single a", (s1[0]-full_a[0,20:21]).abs().max().item())
