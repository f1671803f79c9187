"""QuantizeKVCache: store K and V in the cache as low-bit codes and attend over the quantized cache.

Requires: -
Provides: {"kv_quantized"}

K is quantized after RoPE, as a serving cache stores it (Atom's simulation quantized K before RoPE;
the rotation mixes channel pairs, and post-RoPE storage is what the attention kernels read with no
extra work). Asymmetric, one group per (token, head) over head_dim, float16 (scale, zero) pairs::

    Before: (..., cache_seqlens, k_cache, v_cache)
            %lens = atom.kv_cache_store(%k, %v, %k_cache, %v_cache, %cache_seqlens)
            %a    = atom.attention(%q, %k_cache, %v_cache, %lens)
    After:  (..., cache_seqlens, k_cache, v_cache, k_params, v_params)    # k_cache: uint8 [B, Hkv, S, D/2]
            %lens = atom.kv_cache_store_quant(%k, %v, %k_cache, %k_params, %v_cache, %v_params, %cache_seqlens, 4, 1.0)
            %a    = atom.attention_quant_kv(%q, %k_cache, %k_params, %v_cache, %v_params, %lens, 4)

Every new token is written to the cache before attention reads it, in prefill as in decode, so the
full forward pass and incremental decoding see the same quantized keys and values.
"""

from __future__ import annotations

import torch.fx as fx

from .base import AtomPass, PassResult, atom


class QuantizeKVCache(AtomPass):
    provides = frozenset({"kv_quantized"})

    def call(self, gm: fx.GraphModule) -> PassResult:
        bits = self.ctx.config.kv_bits
        if bits is None:
            return PassResult(gm, False)
        D = self.ctx.arch.head_dim
        if (D * bits) % 8 or D % (8 // bits if bits < 8 else 1):
            raise ValueError(f"head_dim {D} cannot be packed at {bits} bits per value")
        nodes = {n.name: n for n in gm.graph.nodes}
        store = next(n for n in gm.graph.nodes if n.target == atom.kv_cache_store.default)
        attn = next(n for n in gm.graph.nodes if n.target == atom.attention.default)
        k, v, k_cache, v_cache, seqlens = store.args
        with gm.graph.inserting_after(nodes["v_cache"]):
            v_params = gm.graph.placeholder("v_params")
        with gm.graph.inserting_after(nodes["v_cache"]):
            k_params = gm.graph.placeholder("k_params")
        clip = self.ctx.config.kv_clip
        store.target = atom.kv_cache_store_quant.default  # rewritten in place, names kept
        store.args = (k, v, k_cache, k_params, v_cache, v_params, seqlens, bits, clip)
        attn.target = atom.attention_quant_kv.default
        attn.args = (attn.args[0], k_cache, k_params, v_cache, v_params, store, bits)
        store.meta["atom.kv"] = {"bits": bits, "clip": clip, "layout": "asymmetric per (token, head), K after RoPE"}
        packed = D * bits // 8
        gm.meta["atom.kv_cache_spec"] = [
            ("k_cache", "uint8", packed), ("v_cache", "uint8", packed), ("k_params", "float16", 2),
            ("v_params", "float16", 2),
        ]
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)
