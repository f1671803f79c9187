"""Capture: one Hugging Face decoder layer -> one torch.fx GraphModule in ``atom`` ops.

We trace a small functional decoder of our own (``DecoderLayerForCapture``) that holds the HF layer's
weights, rather than ``torch.export`` of the HF module. The export graph is ATen-level: RMSNorm comes
out as pow/mean/add/rsqrt/mul, attention as SDPA with mask plumbing, and the KV cache as HF's Python
object outside the graph. Our graph has one node per concept (``atom.rms_norm``, ``aten.linear``,
``atom.rope``, ``atom.kv_cache_store``, ``atom.attention``), the KV cache as explicit inputs, and
nodes named after the modules (``q_proj``, ``input_layernorm``), so the pass dumps read like the
model and the passes match single nodes instead of decomposed patterns.

The captured layer (SmolLM2)::

    def forward(self, hidden_states, cos, sin, cache_seqlens, k_cache, v_cache):
        input_layernorm = atom.rms_norm(hidden_states, input_layernorm_weight, 1e-05, None)
        q_proj = aten.linear(input_layernorm, q_proj_weight, None)      # k_proj, v_proj alike
        q_rope = atom.rope(q_proj, cos, sin);  k_rope = atom.rope(k_proj, cos, sin)
        kv_lens = atom.kv_cache_store(k_rope, v_proj, k_cache, v_cache, cache_seqlens)
        attention = atom.attention(q_rope, k_cache, v_cache, kv_lens)
        o_proj = aten.linear(attention, o_proj_weight, None)
        residual = hidden_states + o_proj
        post_attention_layernorm = atom.rms_norm(residual, post_attention_layernorm_weight, ...)
        gate_proj = aten.linear(...);  up_proj = aten.linear(...)
        silu = aten.silu(gate_proj);  mlp_act = aten.mul(silu, up_proj)
        down_proj = aten.linear(mlp_act, down_proj_weight, None)
        return residual + down_proj
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

import atom_compile.ops  # noqa: F401  (registers torch.ops.atom)
from atom_compile.models import ArchInfo

aten = torch.ops.aten
atom = torch.ops.atom

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
LAYER_INPUTS = ("hidden_states", "cos", "sin", "cache_seqlens", "k_cache", "v_cache")


class DecoderLayerForCapture(nn.Module):
    """A Llama-family decoder layer written in ``atom`` ops, holding copies of the HF weights."""

    def __init__(self, hf_layer: nn.Module, arch: ArchInfo):
        super().__init__()
        self.eps = arch.rms_norm_eps
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        modules = {
            "q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj, "o_proj": attn.o_proj,
            "gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj, "down_proj": mlp.down_proj,
        }
        for name, lin in modules.items():
            self.register_buffer(f"{name}_weight", lin.weight.detach().clone())
            if lin.bias is not None:
                self.register_buffer(f"{name}_bias", lin.bias.detach().clone())
        self.register_buffer("input_layernorm_weight", hf_layer.input_layernorm.weight.detach().clone())
        self.register_buffer(
            "post_attention_layernorm_weight", hf_layer.post_attention_layernorm.weight.detach().clone()
        )

    def _linear(self, x, name):
        return aten.linear.default(x, getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias", None))

    def forward(self, hidden_states, cos, sin, cache_seqlens, k_cache, v_cache):
        normed = atom.rms_norm.default(hidden_states, self.input_layernorm_weight, self.eps, None)
        q = self._linear(normed, "q_proj")
        k = self._linear(normed, "k_proj")
        v = self._linear(normed, "v_proj")
        q = atom.rope.default(q, cos, sin)
        k = atom.rope.default(k, cos, sin)
        kv_lens = atom.kv_cache_store.default(k, v, k_cache, v_cache, cache_seqlens)
        attn = atom.attention.default(q, k_cache, v_cache, kv_lens)
        residual = hidden_states + self._linear(attn, "o_proj")
        normed = atom.rms_norm.default(residual, self.post_attention_layernorm_weight, self.eps, None)
        gate = self._linear(normed, "gate_proj")
        up = self._linear(normed, "up_proj")
        act = aten.mul.Tensor(aten.silu.default(gate), up)
        return residual + self._linear(act, "down_proj")


def _rename(node: fx.Node, name: str) -> None:
    node._rename(name)


def capture_layer(hf_layer: nn.Module, arch: ArchInfo, layer_index: int = 0) -> fx.GraphModule:
    """Trace one decoder layer to an FX GraphModule whose nodes are named after the model's modules."""
    gm = fx.symbolic_trace(DecoderLayerForCapture(hf_layer, arch))
    for node in gm.graph.nodes:
        if node.target == aten.linear.default:
            _rename(node, node.args[1].target.removesuffix("_weight"))
        elif node.target == atom.rms_norm.default:
            _rename(node, node.args[1].target.removesuffix("_weight"))
        elif node.target == atom.rope.default:
            _rename(node, f"{node.args[0].name[0]}_rope")
        elif node.target == aten.mul.Tensor:
            _rename(node, "mlp_act")
        elif node.target == atom.kv_cache_store.default:
            _rename(node, "kv_lens")
        elif node.target == atom.attention.default:
            _rename(node, "attention")
    # the first residual add is the input of post_attention_layernorm
    for node in gm.graph.nodes:
        if node.name == "post_attention_layernorm":
            _rename(node.args[0], "residual")
    gm.graph.lint()
    gm.recompile()
    gm.meta["atom.layer_index"] = layer_index
    gm.meta["atom.arch"] = arch
    gm.meta["atom.kv_cache_spec"] = float_kv_cache_spec(arch)
    return gm


def float_kv_cache_spec(arch: ArchInfo) -> list[tuple[str, str, int]]:
    """The cache inputs of a float layer: (placeholder name, dtype name or "model", last dim)."""
    return [("k_cache", "model", arch.head_dim), ("v_cache", "model", arch.head_dim)]


def example_inputs(arch: ArchInfo, batch: int = 1, seq: int = 8, dtype=torch.float32, device="cpu"):
    """Small random inputs with the layer's signature, for shape propagation and tests."""
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(batch, seq, arch.hidden_size, generator=g).to(dtype=dtype, device=device)
    pos = torch.arange(seq, dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, arch.head_dim, 2, dtype=torch.float32) / arch.head_dim))
    freqs = torch.outer(pos, inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos = emb.cos().expand(batch, seq, -1).to(dtype=dtype, device=device)
    sin = emb.sin().expand(batch, seq, -1).to(dtype=dtype, device=device)
    seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
    return hidden, cos, sin, seqlens
