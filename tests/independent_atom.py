"""An independent simulation of Atom on the Hugging Face model itself, for end-to-end agreement checks.

It shares no code with atom_compile's graphs or quantization (it uses tests/fake_quant.py): every linear of
the HF model is replaced by a function that gathers its input channels by the outlier order, fake-quantizes
them (INT4 groups, INT8 outliers last) and multiplies by the equally reordered, fake-quantized weight; the
attention function fake-quantizes K (after RoPE) and V per token and head. Outlier orders are taken layer
by layer, with the earlier layers already quantized, from sum(x^2) of each linear input. With
``kv_rotation`` it rotates each head of Q and K (after RoPE) and of V by its own Hadamard matrix, V through
v_proj's rows and back through o_proj's columns, before anything is quantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from atom_compile.passes.outlier_analysis import block_channel_order, chunk_channel_order, chunk_order_fits
from fake_quant import fake_quant_kv, fake_quant_rows

SHARED_INPUTS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gu",
                 "up_proj": "gu", "down_proj": "down"}


def _hadamard(n):
    """Orthonormal Sylvester-Hadamard matrix by Kronecker products, in float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h / n**0.5


def _kv_quant_attention(module, query, key, value, attention_mask, **kwargs):
    cfg = getattr(module, "atom_kv", None)
    if getattr(module, "atom_rotation", None) is not None:  # [batch, heads, tokens, head_dim] @ H
        h = module.atom_rotation.to(query.dtype)
        query, key = query @ h, key @ h
    if cfg is not None:
        key = fake_quant_kv(key, cfg.kv_bits, cfg.kv_clip)
        value = fake_quant_kv(value, cfg.kv_bits, cfg.kv_clip)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("independent_atom_kv", _kv_quant_attention)


def _linears(layer):
    a, m = layer.self_attn, layer.mlp
    return {"q_proj": a.q_proj, "k_proj": a.k_proj, "v_proj": a.v_proj, "o_proj": a.o_proj,
            "gate_proj": m.gate_proj, "up_proj": m.up_proj, "down_proj": m.down_proj}


def _rotate_value_heads(attn, head_dim):
    """v_proj's rows and o_proj's columns rotated per head, so the values (and the attention output) are."""
    h = _hadamard(head_dim)
    v, o = attn.v_proj, attn.o_proj
    v.weight.data = (h @ v.weight.double().view(-1, head_dim, v.in_features)).reshape_as(v.weight).to(v.weight.dtype)
    if v.bias is not None:
        v.bias.data = (h @ v.bias.double().view(-1, head_dim, 1)).reshape_as(v.bias).to(v.bias.dtype)
    o.weight.data = (o.weight.double().view(o.out_features, -1, head_dim) @ h).reshape_as(o.weight).to(o.weight.dtype)
    attn.atom_rotation = h


def _install(lin, perm, spec, cfg):
    """Replace lin.forward: y = fq(x[..., perm]) @ fq(W[:, perm])^T (+ bias); gate/up rows are not touched."""
    wq = fake_quant_rows(lin.weight.detach()[:, perm], spec, "weight")

    def forward(x):
        xp = x[..., perm]
        if cfg.act_format is not None:
            xp = fake_quant_rows(xp, spec, "act")
        return F.linear(xp, wq, lin.bias)

    lin.forward = forward


@torch.no_grad()
def simulate_atom(model, calib_ids, cfg, orders=None, max_layers=None):
    """Quantize ``model`` in place (fake quant) the way Atom describes; returns (model, orders used).

    ``orders``: optional {layer index: {"qkv"|"o"|"gu"|"down": perm}} to use instead of computing them.
    """
    model.config._attn_implementation = "independent_atom_kv"
    used = {}
    for index, layer in enumerate(model.model.layers[:max_layers]):
        if cfg.kv_rotation:
            c = model.config
            _rotate_value_heads(layer.self_attn, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
        sq = {}
        hooks = []
        for name, lin in _linears(layer).items():
            def hook(_m, args, key=SHARED_INPUTS[name]):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sq[key] = sq.get(key, 0) + (x * x).sum(0)
            hooks.append(lin.register_forward_pre_hook(hook))
        if orders is None:
            model(calib_ids)
        for h in hooks:
            h.remove()
        used[index] = {}
        for name, lin in _linears(layer).items():
            spec = cfg.resolve(lin.in_features)
            key = SHARED_INPUTS[name]
            if orders is not None:
                perm = orders[index][key]
            elif spec.n_outliers:
                perm = torch.argsort(sq[key], stable=True)  # Atom's order: outliers (the top n) last
                if cfg.channel_order == "chunks" and chunk_order_fits(lin.in_features, spec.group_size):
                    # which normal channels share a group: the library's run grouping (tested on its own in
                    # tests/passes/test_outlier_analysis.py) on this independently computed score order
                    perm = chunk_channel_order(perm, spec.n_outliers, spec.group_size)
                elif cfg.channel_order == "blocks":
                    perm = block_channel_order(perm, spec.n_outliers, spec.group_size)
            else:
                perm = torch.arange(lin.in_features)
            used[index][key] = perm
            _install(lin, perm, spec, cfg)
        if cfg.kv_bits is not None:
            layer.self_attn.atom_kv = cfg
    return model, used
