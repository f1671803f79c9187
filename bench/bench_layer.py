"""A whole Llama-7B-shaped decoder layer (or Llama-3-8B-shaped, GQA: ``--shape llama3-8b``): Atom W4A4 + 4-bit KV
(Triton) against bf16 (cuBLAS + SDPA).

Random weights (speed only). Decode: batch 64, one new token per sequence, 1024 cached tokens. Prefill: 4096
tokens of one sequence. Both layers run under CUDA graphs, as a serving engine's decode loop does; both use
the same plain-PyTorch RMSNorm and RoPE outside the fused ops. The bf16 layer writes its new K/V into a bf16
cache and attends with torch SDPA; ours is the compiled graph lowered to the Triton backend. Two bf16 layers: the
linears as transformers holds them (bf16_us, "speedup") and with q/k/v and gate/up each one GEMM over concatenated
weights, as vLLM serves them (bf16_fused_us, "speedup_vs_fused"); ours fuses them too (FuseSiblingGemms).
Ours is called as ``AtomForCausalLM.forward`` calls it: inside ``uniform_cache_length`` with the cache length every
sequence held before a multi-token step (0 for the prefill: its attention then runs on cuDNN over the dequantized
4-bit K/V; the variant "prefill attention on the Triton kernel" leaves it unset).

    python -m bench.bench_layer --out bench/results/layer_h100.json [--quick] [--shape llama3-8b]
"""

from __future__ import annotations

import argparse
import copy
import importlib

import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from atom_compile.calibration import LayerCalibration
from atom_compile.capture import capture_layer
from atom_compile.cli import _parse_overrides
from atom_compile.config import get_config
from atom_compile.kv_cache import allocate_layer_cache, uniform_cache_length
from atom_compile.lowering import lower
from atom_compile.models import check_architecture
from atom_compile.ops import _rms_norm, rope_reference
from atom_compile.passes import FuseSiblingGemms, MergeSlicedHeadOps, PassContext
from atom_compile.pipeline import PIPELINE, run_pipeline
from bench.common import bench_us, report

DEV = "cuda"
DT = torch.bfloat16


SHAPES = {  # (hidden, intermediate, query heads, KV heads)
    "llama-7b": (4096, 11008, 32, 32),  # the layer (MHA)
    "llama3-8b": (4096, 14336, 32, 8),  # GQA with 8 KV heads, as most current models
}


def layer_config(quick: bool, shape: str = "llama-7b") -> LlamaConfig:
    if quick:
        return LlamaConfig(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=8,
                           num_hidden_layers=1, vocab_size=32000)
    hidden, inter, heads, kv_heads = SHAPES[shape]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, num_hidden_layers=1, vocab_size=32000)


def rotary(positions: torch.Tensor, D: int, base: float = 10000.0):
    inv = 1.0 / (base ** (torch.arange(0, D, 2, device=DEV, dtype=torch.float32) / D))
    f = positions.float()[..., None] * inv
    emb = torch.cat([f, f], -1)
    return emb.cos().to(DT), emb.sin().to(DT)


class Bf16Layer:
    """The baseline a user would run: bf16 weights, cuBLAS GEMMs, SDPA over a bf16 KV cache."""

    def __init__(self, layer: LlamaDecoderLayer, cfg: LlamaConfig, fused: bool = False):
        a, m = layer.self_attn, layer.mlp
        self.w = {n: getattr(a, n).weight for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        self.w.update({n: getattr(m, n).weight for n in ("gate_proj", "up_proj", "down_proj")})
        # fused: q/k/v and gate/up as one GEMM each (concatenated weights, as vLLM serves them)
        self.qkv = torch.cat([self.w[n] for n in ("q_proj", "k_proj", "v_proj")]) if fused else None
        self.gate_up = torch.cat([self.w["gate_proj"], self.w["up_proj"]]) if fused else None
        self.n1, self.n2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.eps = cfg.rms_norm_eps
        self.H, self.Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.D = cfg.hidden_size // self.H

    def __call__(self, x, cos, sin, k_cache, v_cache, start: int):
        B, T, _ = x.shape
        h = _rms_norm(x, self.n1, self.eps, None)
        if self.qkv is not None:
            q, k, v = F.linear(h, self.qkv).split([self.w[n].shape[0] for n in ("q_proj", "k_proj", "v_proj")], -1)
        else:
            q, k, v = (F.linear(h, self.w[n]) for n in ("q_proj", "k_proj", "v_proj"))
        q, k = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
        k_cache[:, :, start : start + T] = k.view(B, T, self.Hkv, self.D).transpose(1, 2)
        v_cache[:, :, start : start + T] = v.view(B, T, self.Hkv, self.D).transpose(1, 2)
        qh = q.view(B, T, self.H, self.D).transpose(1, 2)
        kh, vh = k_cache[:, :, : start + T], v_cache[:, :, : start + T]
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=T > 1, enable_gqa=self.Hkv != self.H)
        x = x + F.linear(o.transpose(1, 2).reshape(B, T, -1), self.w["o_proj"])
        h = _rms_norm(x, self.n2, self.eps, None)
        if self.gate_up is not None:
            gate, up = F.linear(h, self.gate_up).chunk(2, -1)
        else:
            gate, up = F.linear(h, self.w["gate_proj"]), F.linear(h, self.w["up_proj"])
        return x + F.linear(F.silu(gate) * up, self.w["down_proj"])


def compile_atom_layer(layer, cfg, config_name: str, overrides: dict | None = None, passes=PIPELINE):
    arch = check_architecture(cfg)
    gm = capture_layer(layer, arch, 0)
    calib_h = torch.randn(4, 128, cfg.hidden_size, device=DEV, dtype=DT)
    cos, sin = rotary(torch.arange(128, device=DEV)[None], arch.head_dim)
    ctx = PassContext(get_config(config_name, **(overrides or {})), arch,
                      LayerCalibration(calib_h, cos, sin, arch.num_kv_heads, 4))
    gm = run_pipeline(gm, ctx, passes=passes)
    ref = lower(copy.deepcopy(gm), "reference")
    return lower(gm, "triton"), ref, arch


def fill_quant_cache(caches, n: int):
    """Random 4-bit codes and realistic (scale, zero) for the first n slots of every sequence."""
    for c in caches:
        if c.dtype == torch.uint8:
            c[:, :, :n].random_(0, 256)
        else:
            c[:, :, :n, 0] = 0.02
            c[:, :, :n, 1] = 8.0


def kernel_breakdown(fn, steps: int = 3) -> list[dict]:
    """CUDA time per kernel name over ``steps`` eager calls (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append({"kernel": e.key[:60], "us_per_layer": t / steps, "calls_per_layer": e.count / steps})
    return sorted(rows, key=lambda r: -r["us_per_layer"])[:12]


def _variant(name: str, atom, layer, cfg, config_name, overrides):
    """A callable: the compiled layer with one optimization switched off (for the A/B rows)."""
    import atom_compile.lowering.triton as lt
    from atom_compile.lowering import relower
    from atom_compile.runtime_kernels import kv_attention

    if name == "atom, quantizers write packed codes":
        lt.X16_ACTIVATIONS = False
        try:
            return relower(copy.deepcopy(atom), "triton")
        finally:
            lt.X16_ACTIVATIONS = True
    if name == "atom, tensor-core decode attention":
        gm = copy.deepcopy(atom)

        def call(*args, _gm=gm):
            kv_attention.ROW_KERNEL = False
            try:
                return _gm(*args)
            finally:
                kv_attention.ROW_KERNEL = True
        return call
    if name == "atom, large-M GEMM on the Triton kernel":  # (not cuBLAS's block-scaled FP8 GEMM; prefill only)
        wk = importlib.import_module("atom_compile.runtime_kernels.w4a4_gemm")  # (the package re-exports a function so named)

        def call_triton(*args, _gm=atom):
            wk.set_large_m_backend("triton")
            try:
                return _gm(*args)
            finally:
                wk.set_large_m_backend("cublas_fp8")
        return call_triton
    if name == "atom, sibling GEMMs not fused":  # (nor, then, the q / k head ops that run on their slices)
        passes = [p for p in PIPELINE if p not in (FuseSiblingGemms, MergeSlicedHeadOps)]
        return compile_atom_layer(layer, cfg, config_name, overrides, passes=passes)[0]
    raise ValueError(name)


VARIANTS = ("atom, quantizers write packed codes", "atom, tensor-core decode attention", "atom, sibling GEMMs not fused",
            "atom, large-M GEMM on the Triton kernel", "atom, prefill attention on the Triton kernel")


def run(quick: bool, out: str | None, config_name: str, overrides: dict | None = None,
        variants: bool = False, decode_batches: list[int] | None = None, shape: str = "llama-7b") -> None:
    torch.manual_seed(0)
    cfg = layer_config(quick, shape)
    layer = LlamaDecoderLayer(cfg, 0).to(DEV, DT).eval()
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    base, base_fused = Bf16Layer(layer, cfg), Bf16Layer(layer, cfg, fused=True)
    atom, ref, arch = compile_atom_layer(layer, cfg, config_name, overrides)
    spec = atom.meta["atom.kv_cache_spec"]
    Hkv, D = cfg.num_key_value_heads, arch.head_dim
    rows, extra = [], {"breakdown": {}}
    cases = [("decode", 64 if not quick else 16, 1, 1024 if not quick else 256), ("prefill", 1, 4096 if not quick else 512, 0)]
    if decode_batches:  # decode only, at these batch sizes
        cases = [(f"decode b{b}", b, 1, 1024 if not quick else 256) for b in decode_batches]
    with torch.no_grad():
        for name, B, T, ctx_len in cases:
            S = ctx_len + T
            x = torch.randn(B, T, cfg.hidden_size, device=DEV, dtype=DT)
            pos = torch.arange(ctx_len, ctx_len + T, device=DEV)[None].expand(B, -1)
            cos, sin = rotary(pos, D)
            kq = allocate_layer_cache(spec, B, Hkv, S, DT, DEV)
            fill_quant_cache(kq, ctx_len)
            seqlens = torch.full((B,), ctx_len, dtype=torch.int32, device=DEV)
            kb, vb = (torch.randn(B, Hkv, S, D, device=DEV, dtype=DT) for _ in range(2))
            def call(fn, hint=ctx_len):  # as the runtime does: every sequence's cache held ctx_len tokens
                with uniform_cache_length(hint if T > 1 else None):
                    return fn(x, cos, sin, seqlens, *kq)

            # correctness: the Triton layer against the same graph on the reference ops
            y_ref = ref(x, cos, sin, seqlens, *[c.clone() for c in kq])
            y = call(atom)
            rel = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
            t_bf16 = bench_us(lambda: base(x, cos, sin, kb, vb, ctx_len))
            t_fused = bench_us(lambda: base_fused(x, cos, sin, kb, vb, ctx_len))
            t_atom = bench_us(lambda: call(atom))
            rows.append({"case": name, "batch": B, "new_tokens": T, "context": ctx_len, "bf16_us": t_bf16,
                         "bf16_fused_us": t_fused, "atom_us": t_atom, "speedup": t_bf16 / t_atom,
                         "speedup_vs_fused": t_fused / t_atom, "rel_err_vs_reference": rel})
            for vname in VARIANTS if variants else ():
                if vname == "atom, prefill attention on the Triton kernel":
                    if T == 1:
                        continue
                    t_v = bench_us(lambda: call(atom, hint=None))
                else:
                    fn = _variant(vname, atom, layer, cfg, config_name, overrides)
                    t_v = bench_us(lambda fn=fn: call(fn))
                rows.append({"case": f"{name} ({vname})", "batch": B, "new_tokens": T, "context": ctx_len,
                             "bf16_us": t_bf16, "bf16_fused_us": t_fused, "atom_us": t_v, "speedup": t_bf16 / t_v,
                             "speedup_vs_fused": t_fused / t_v, "rel_err_vs_reference": float("nan")})
            extra["breakdown"][name] = {
                "atom": kernel_breakdown(lambda: call(atom)),
                "bf16": kernel_breakdown(lambda: base(x, cos, sin, kb, vb, ctx_len)),
            }
    extra["overrides"] = overrides or {}
    report(f"decoder layer ({'quick' if quick else shape} shapes, {config_name} {overrides or ''} vs bf16)",
           rows, out, extra)
    for name, b in extra["breakdown"].items():
        for side in ("atom", "bf16"):
            print(f"\n{name} / {side}: top kernels (us per layer call)")
            for r in b[side][:8]:
                print(f"  {r['us_per_layer']:9.1f}  x{r['calls_per_layer']:.0f}  {r['kernel']}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--config", default="atom-w4a4-rtn")
    ap.add_argument("--set", action="append", metavar="KNOB=VALUE", default=[],
                    help="override an AtomConfig knob, e.g. --set kv_rotation=false")
    ap.add_argument("--variants", action="store_true",
                    help="also time the layer with packed quantizer codes and with tensor-core decode attention")
    ap.add_argument("--decode-batches", default=None, help="decode only, at these batch sizes, e.g. 1,16,64,256")
    ap.add_argument("--shape", default="llama-7b", choices=sorted(SHAPES),
                    help="the layer's shape: llama-7b (the issue's, MHA) or llama3-8b (GQA, 8 KV heads)")
    a = ap.parse_args()
    run(a.quick, a.out, a.config, _parse_overrides(a.set), a.variants,
        [int(b) for b in a.decode_batches.split(",")] if a.decode_batches else None, a.shape)
