"""Where do the Triton and reference lowerings of one layer diverge? Per-node relative error on the GPU."""

import copy
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import atom_compile
from atom_compile import AtomConfig
from atom_compile.instruments import CaptureValues
from atom_compile.kv_cache import allocate_layer_cache


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item(), (a != b).float().mean().item()


def main(dtype):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64)
    m = LlamaForCausalLM(cfg).eval().cuda().to(dtype)
    calib = torch.randint(0, 64, (2, 16), device="cuda")
    q = atom_compile.compile(m, calib, AtomConfig(group_size=64, n_outliers=64), progress=False, backend="reference")
    gm_ref = q.layers[0]
    gm_tri = copy.deepcopy(gm_ref)
    for n in gm_tri.graph.nodes:  # back to the atom ops, then bind them to the Triton kernels
        if "atom.op" in n.meta:
            n.target = n.meta["atom.op"]
    gm_tri = atom_compile.lowering.lower(gm_tri, "triton")
    assert any(r[2].startswith("triton") for r in gm_tri.meta["atom.kernel_table"])
    x = torch.randn(2, 12, 256, device="cuda", dtype=dtype)
    pos = torch.arange(12, device="cuda")[None].expand(2, -1)
    cos, sin = m.model.rotary_emb(x, pos)
    results = []
    for gm in (gm_ref, gm_tri):
        caches = allocate_layer_cache(gm.meta["atom.kv_cache_spec"], 2, 2, 12, dtype, "cuda")
        c = CaptureValues(gm)
        with torch.no_grad():
            c.run(x, cos, sin, torch.zeros(2, dtype=torch.int32, device="cuda"), *caches)
        results.append(c.values)
    print(f"--- {dtype}: node, rel err per output, fraction of elements that differ")
    for name, outs in results[0].items():
        as_list = lambda v: list(v) if isinstance(v, tuple) else [v]  # noqa: E731
        cells = [f"{rel(t, r)[0]:.2e}/{rel(t, r)[1]:.3f}" if t.shape == r.shape else "x16 codes (not compared)"
                 for t, r in zip(as_list(results[1][name]), as_list(outs)) if isinstance(r, torch.Tensor)]
        print(f"{name:40s} " + "  ".join(cells))


if __name__ == "__main__":
    for dt in (torch.float32, torch.bfloat16):
        main(dt)
