"""Incremental decoding through the model's own KV cache gives the logits of the full forward pass.

Stated tolerance: |logits_decode - logits_full| <= 2e-3 * max|logits_full| for the fp config in float32.
The quantized configs are compared in float64, to 1e-9 * max|logits|: K/V and activations are quantized
per token, so both paths quantize identical values and only the summation order of matmuls over 1 vs many
rows differs. In float32 that difference flips a rounding boundary now and then, and a flipped 4-bit (or
8-bit) code moves a value by a whole step; measured on this model, it moves single logits by up to 2.2
(of 32) after 30 layers, while float64 leaves 3e-14. Float64 keeps the check sharp.
"""

import pytest
import torch

import atom_compile


@pytest.fixture(scope="module")
def tokens(eval_ids):
    return eval_ids[1000:1048].unsqueeze(0)


@pytest.mark.parametrize("config", ["fp", "atom-w4a4-rtn", "atom-w4a4-rtn-paper-kv"])
def test_decode_matches_full_forward(smollm2, smollm2_f64, calib_text, tokens, config):
    """``-paper-kv``: the preset without the KV rotation."""
    model, tok = smollm2 if config == "fp" else smollm2_f64
    name = config.removesuffix("-paper-kv")
    cfg = atom_compile.get_config(name, **({"kv_rotation": False} if name != config else {}))
    qm = atom_compile.compile(model, [calib_text[:60_000]], cfg, tokenizer=tok, calib_samples=4,
                              calib_seqlen=128, progress=False)
    full = qm(tokens)
    cache = qm.new_cache(1, tokens.shape[1])
    parts = [qm(tokens[:, :16], cache)]
    for t in range(16, tokens.shape[1]):
        parts.append(qm(tokens[:, t : t + 1], cache))
    step = torch.cat(parts, dim=1)
    assert int(cache.seqlens) == tokens.shape[1]
    bound = 2e-3 if config == "fp" else 1e-9
    assert (step - full).abs().max() <= bound * full.abs().max()


@pytest.mark.parametrize("config", ["w8a8", "atom-w4a4-rtn"])
def test_batched_decode_with_ragged_starts(smollm2_f64, calib_text, tokens, config):
    """Two sequences of different lengths in one cache (a right-padded prefill, then one decode step for
    both): each matches its own full forward."""
    model, tok = smollm2_f64
    qm = atom_compile.compile(model, [calib_text[:60_000]], config, tokenizer=tok, calib_samples=4,
                              calib_seqlen=128, progress=False)
    a, b = tokens[:, :24], tokens[:, 24:48]
    full_a, full_b = qm(a), qm(b[:, :13])
    cache = qm.new_cache(2, 32)
    qm(torch.cat([a[:, :20], b[:, :20]]), cache)
    cache.set_lengths([20, 12])  # b is 12 tokens long: its last 8 prefill tokens were padding
    step = qm(torch.cat([a[:, 20:21], b[:, 12:13]]), cache)
    assert (step[0] - full_a[0, 20:21]).abs().max() <= 1e-9 * full_a.abs().max()
    assert (step[1] - full_b[0, 12:13]).abs().max() <= 1e-9 * full_b.abs().max()


def test_generate_uses_the_cache(smollm2):
    model, tok = smollm2
    qm = atom_compile.compile(model, None, "fp", tokenizer=tok, progress=False)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    ours = qm.generate(ids, max_new_tokens=8)
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, ref[:, : ours.shape[1]])


def _tiny_w4a4_f64():
    from transformers import LlamaConfig, LlamaForCausalLM

    from atom_compile import AtomConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().double()
    return atom_compile.compile(model, torch.randint(0, 64, (2, 16)), AtomConfig(group_size=32, n_outliers=32),
                                progress=False)


def test_generate_ragged_prompts_continue_as_each_alone():
    """Prompts of different lengths in one batch (right-padded, ``lengths``) give each prompt's own greedy
    continuation (W4A4 + KV4, float64 so that batching cannot flip a rounding); with an EOS a row stops after it."""
    q = _tiny_w4a4_f64()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 64, (n,), generator=g) for n in (5, 9, 2)]
    ids = torch.zeros(3, 9, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    alone = [q.generate(p[None], 6)[0] for p in prompts]
    batched = q.generate(ids, 6, lengths=[5, 9, 2])
    assert isinstance(batched, list) and len(batched) == 3
    for a, r in zip(alone, batched):
        assert torch.equal(a, r)
    eos = int(alone[0][5])  # prompt 0's first new token: its row ends there
    batched = q.generate(ids, 6, lengths=[5, 9, 2], eos_token_id=eos)
    assert torch.equal(batched[0], alone[0][:6])
    for a, r in zip(alone[1:], batched[1:]):  # the same tokens, up to and including an EOS if one came
        assert torch.equal(a[: len(r)], r) and (len(r) == len(a) or int(r[-1]) == eos)


def test_generate_lengths_are_checked():
    q = _tiny_w4a4_f64()
    ids = torch.randint(1, 64, (2, 4))
    for bad in ([4], [0, 3], [5, 2]):
        with pytest.raises(ValueError, match="prompt lengths"):
            q.generate(ids, 2, lengths=bad)


def test_generate_text_takes_a_batch_of_prompts(smollm2):
    model, tok = smollm2
    qm = atom_compile.compile(model, None, "fp", tokenizer=tok, progress=False)
    prompts = ["The capital of France is", "One, two, three, four,"]
    batched = qm.generate_text(prompts, max_new_tokens=6)
    assert batched == [qm.generate_text(p, max_new_tokens=6) for p in prompts]
    with pytest.raises(ValueError, match="empty"):
        qm.generate_text([], max_new_tokens=2)


def test_generate_takes_a_transformers_attention_mask():
    """Left padding with an attention mask (as transformers' tokenizers pad for generation) gives the rows that
    right padding with ``lengths`` gives; a mask of the wrong shape, or with lengths too, is refused."""
    q = _tiny_w4a4_f64()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 64, (n,), generator=g) for n in (6, 3)]
    left = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    right = torch.zeros(2, 6, dtype=torch.long)
    for b, p in enumerate(prompts):
        left[b, 6 - len(p):] = p
        mask[b, 6 - len(p):] = 1
        right[b, : len(p)] = p
    by_mask = q.generate(left, 5, attention_mask=mask)
    by_lengths = q.generate(right, 5, lengths=[6, 3])
    assert all(torch.equal(a, b) for a, b in zip(by_mask, by_lengths))
    with pytest.raises(ValueError, match="shape"):
        q.generate(left, 2, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="not both"):
        q.generate(left, 2, attention_mask=mask, lengths=[6, 3])
