"""The compiled model: embeddings, one lowered GraphModule per decoder layer, final norm, LM head, KV cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from atom_compile.kv_cache import KVCache, uniform_cache_length
from atom_compile.models import ArchInfo
from atom_compile.ops import rms_norm_reference


class AtomForCausalLM(nn.Module):
    """A causal LM whose decoder layers are compiled Atom graphs.

    ``model(input_ids)`` returns logits [B, T, vocab]. With ``cache=model.new_cache(B, max_len)``,
    successive calls append to the model's own (quantized) KV cache: incremental decoding.
    Embeddings, the final norm and the LM head stay in the model's floating-point dtype, as in Atom.
    """

    def __init__(
        self,
        arch: ArchInfo,
        layers: list[fx.GraphModule],
        embed_weight: Tensor,
        norm_weight: Tensor,
        lm_head_weight: Tensor,
        rotary_emb: nn.Module,
        config,
        tokenizer=None,
        hf_config: dict | None = None,
    ):
        super().__init__()
        self.arch = arch
        self.layers = nn.ModuleList(layers)
        self.embed_weight = nn.Parameter(embed_weight, requires_grad=False)
        self.norm_weight = nn.Parameter(norm_weight, requires_grad=False)
        tied = lm_head_weight.data_ptr() == embed_weight.data_ptr()
        self.lm_head_weight = self.embed_weight if tied else nn.Parameter(lm_head_weight, requires_grad=False)
        self.rotary_emb = rotary_emb
        self.atom_config = config
        self.tokenizer = tokenizer
        self.hf_config = hf_config  # the source model's config, for saving and for lm-eval

    @property
    def device(self) -> torch.device:
        return self.embed_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_weight.dtype

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        specs = [gm.meta["atom.kv_cache_spec"] for gm in self.layers]
        return KVCache(specs, batch_size, self.arch.num_kv_heads, max_len, self.dtype, self.device)

    def rotary(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.rotary_emb(hidden, positions)

    @torch.no_grad()
    def forward(self, input_ids: Tensor, cache: KVCache | None = None) -> Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        fresh = cache is None
        if cache is None:
            cache = self.new_cache(B, T)
        elif cache.batch_size != B:
            raise ValueError(f"cache holds {cache.batch_size} sequences, input_ids has {B}")
        window = self.arch.sliding_window
        if window is not None and int(cache.seqlens.max()) + T > window:
            raise NotImplementedError(
                f"sequence longer than the model's sliding window ({window}); atom-compile's attention "
                "has no sliding-window support yet"
            )
        positions = cache.seqlens.long().unsqueeze(1) + torch.arange(T, device=input_ids.device)
        hidden = nn.functional.embedding(input_ids, self.embed_weight)
        cos, sin = self.rotary(hidden, positions)
        # the cache length every sequence shares before a multi-token step, if they share one (a fresh cache: 0;
        # else one host read of the lengths, never in a T = 1 decode step, which CUDA graphs capture)
        held = None
        if T > 1:
            lengths = [0] if fresh else cache.seqlens.tolist()
            held = lengths[0] if all(n == lengths[0] for n in lengths) else None
        with uniform_cache_length(held):
            for layer, caches in zip(self.layers, cache.layers):
                hidden = layer(hidden, cos, sin, cache.seqlens, *caches)
        cache.advance(T)
        hidden = rms_norm_reference(hidden, self.norm_weight, self.arch.rms_norm_eps, None)
        return nn.functional.linear(hidden, self.lm_head_weight)

    def can_capture_decode(self) -> str | None:
        """Why one decode step cannot be captured in a CUDA graph (None: it can).

        Capture needs a CUDA device and no host synchronization inside the step: the Triton kernels never read
        device values on the host, while the reference ops (fallbacks, listed in the kernel tables) and the
        sliding-window check do."""
        if self.device.type != "cuda":
            return f"the model is on {self.device}, not a CUDA device"
        if self.arch.sliding_window is not None:
            return "the sliding-window check reads the cache lengths on the host"
        for i, gm in enumerate(self.layers):
            host_side = [row[0] for row in gm.meta.get("atom.kernel_table", []) if not row[2].startswith("triton:")]
            if host_side:
                return f"layer {i} runs {host_side[:3]} on reference ops (backend {gm.meta.get('atom.backend')})"
        return None

    def _capture_decode_step(self, cache: KVCache):
        """One decode step (a token per sequence, written into ``cache``) captured in a CUDA graph.

        Returns (token buffer [B, 1], logits buffer [B, vocab], graph): copy the next tokens into the buffer,
        replay, read the logits. The step is run once first, outside the graph, so that every kernel is compiled
        and allocated; its cache write lands in the slot the next real step overwrites, and its length update is
        undone."""
        ids = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=self.device)
        lengths = cache.seqlens.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self(ids, cache)
        torch.cuda.current_stream(self.device).wait_stream(side)
        cache.seqlens.copy_(lengths)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self(ids, cache)[:, -1]
        return ids, logits, graph

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        cuda_graph: bool | None = None,
        lengths: Sequence[int] | Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor | list[Tensor]:
        """Greedy (temperature 0) or sampled continuation, one token per step through the KV cache.

        ``cuda_graph``: replay each decode step from one CUDA graph (no per-kernel launch cost on the host);
        default: whenever ``can_capture_decode()`` allows. True where it does not raises, saying why.

        ``lengths``: prompts of different lengths in one batch: ``input_ids`` holds them right-padded (any pad
        token) and ``lengths[b]`` is prompt b's length. One prefill runs over the padded batch (a prompt's tokens
        never see the padding after them: attention is causal, quantization per token), then each sequence
        continues from its own last token, its padding overwritten; decode steps attend each sequence's own
        length. Returns then a list of 1-D tensors, prompt b's tokens followed by its continuation (up to and
        including ``eos_token_id``). Without ``lengths``: a [B, T + new] tensor, as before.

        ``attention_mask``: the transformers way of saying the same ([B, T], 1 on a prompt's tokens, 0 on padding,
        left or right): each row's tokens where the mask is 1 are taken in order, then as with ``lengths``."""
        if attention_mask is not None:
            if lengths is not None:
                raise ValueError("give lengths or attention_mask, not both")
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                                 f"got {tuple(attention_mask.shape)}")
            keep = attention_mask.bool().cpu()
            rows = [input_ids[b].cpu()[keep[b]] for b in range(input_ids.shape[0])]
            lengths = [len(r) for r in rows]
            padded = torch.zeros(len(rows), max(max(lengths), 1), dtype=input_ids.dtype)
            for b, r in enumerate(rows):
                padded[b, : len(r)] = r
            input_ids = padded
        B, T = input_ids.shape
        if lengths is not None:
            lengths = torch.as_tensor(lengths, dtype=torch.long).reshape(-1)
            if lengths.numel() != B or bool((lengths < 1).any()) or bool((lengths > T).any()):
                raise ValueError(f"lengths must be {B} prompt lengths in [1, {T}] (input_ids is [{B}, {T}], "
                                 f"right-padded), got {lengths.tolist()}")
        why_not = self.can_capture_decode()
        if cuda_graph and why_not:
            raise ValueError(f"cuda_graph=True, but a decode step cannot be captured: {why_not}")
        use_graph = why_not is None if cuda_graph is None else cuda_graph
        cache = self.new_cache(B, T + max_new_tokens)
        logits = self(input_ids.to(self.device), cache)
        if lengths is None:
            logits = logits[:, -1]
        else:
            logits = logits[torch.arange(B, device=logits.device), lengths.to(logits.device) - 1]
            cache.set_lengths(lengths)
        step = self._capture_decode_step(cache) if use_graph and max_new_tokens > 1 else None
        out = [input_ids.to(self.device)]
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        for _ in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            if eos_token_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                finished |= nxt == eos_token_id
            out.append(nxt.unsqueeze(1))
            if eos_token_id is not None and bool(finished.all()):
                break
            if step is None:
                logits = self(nxt.unsqueeze(1), cache)[:, -1]
            else:
                ids, logits, graph = step  # logits: the graph's output buffer, rewritten by every replay
                ids.copy_(nxt.unsqueeze(1))
                graph.replay()
        if lengths is None:
            return torch.cat(out, dim=1)
        new = torch.cat(out[1:], dim=1) if len(out) > 1 else out[0][:, :0]
        rows = []
        for b in range(B):
            cont = new[b]
            if eos_token_id is not None and bool((cont == eos_token_id).any()):
                cont = cont[: int((cont == eos_token_id).nonzero()[0]) + 1]
            rows.append(torch.cat([out[0][b, : int(lengths[b])], cont]))
        return rows

    def generate_text(self, prompt: str | Sequence[str], max_new_tokens: int = 32, **kw) -> str | list[str]:
        """Decode a continuation of ``prompt`` with the bundled tokenizer; a list of prompts runs as one batch
        (prompts of different lengths right-padded, see ``generate(lengths=...)``) and gives a list of texts."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids to generate()")
        eos = self.tokenizer.eos_token_id
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids
            out = self.generate(ids, max_new_tokens, eos_token_id=eos, **kw)
            return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        if not prompt:
            raise ValueError("generate_text: the list of prompts is empty")
        encoded = [self.tokenizer(p).input_ids for p in prompt]
        if any(len(e) == 0 for e in encoded):
            raise ValueError("generate_text: a prompt encodes to no tokens")
        lengths = [len(e) for e in encoded]
        pad = eos if eos is not None else 0
        ids = torch.tensor([e + [pad] * (max(lengths) - len(e)) for e in encoded])
        outs = self.generate(ids, max_new_tokens, eos_token_id=eos, lengths=lengths, **kw)
        return [self.tokenizer.decode(o[n:], skip_special_tokens=True) for o, n in zip(outs, lengths)]
