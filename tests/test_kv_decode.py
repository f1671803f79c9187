"""Incremental decoding through the model's own KV cache gives the logits of the full forward pass.

Stated tolerance: |logits_decode - logits_full| <= 2e-3 * max|logits_full| for the fp config, and the
same argmax at every position plus a mean |diff| <= 1e-2 * mean|logits| for the quantized ones. K/V and
activations are quantized per token, so both paths quantize identical values; what differs is the
float summation order of matmuls over 1 vs many rows, which can flip a rounding boundary now and then.
"""

import pytest
import torch

import atom_compile


@pytest.fixture(scope="module")
def tokens(eval_ids):
    return eval_ids[1000:1048].unsqueeze(0)


@pytest.mark.parametrize("config", ["fp", "atom-w4a4-rtn"])
def test_decode_matches_full_forward(smollm2, calib_text, tokens, config):
    model, tok = smollm2
    qm = atom_compile.compile(model, [calib_text[:60_000]], config, tokenizer=tok, calib_samples=4,
                              calib_seqlen=128, progress=False)
    full = qm(tokens)
    cache = qm.new_cache(1, tokens.shape[1])
    parts = [qm(tokens[:, :16], cache)]
    for t in range(16, tokens.shape[1]):
        parts.append(qm(tokens[:, t : t + 1], cache))
    step = torch.cat(parts, dim=1)
    assert int(cache.seqlens) == tokens.shape[1]
    if config == "fp":
        assert (step - full).abs().max() <= 2e-3 * full.abs().max()
    else:
        assert torch.equal(step.argmax(-1), full.argmax(-1))
        assert (step - full).abs().mean() <= 1e-2 * full.abs().mean()


def test_batched_decode_with_ragged_starts(smollm2, tokens):
    """Two sequences in one cache, the second started later: each matches its own full forward."""
    model, _ = smollm2
    qm = atom_compile.compile(model, None, "w8a8", progress=False)
    a, b = tokens[:, :24], tokens[:, 24:48]
    full_a, full_b = qm(a), qm(b)
    cache = qm.new_cache(2, 32)
    qm(torch.cat([a[:, :20], b[:, :20]]), cache)
    step = qm(torch.cat([a[:, 20:21], b[:, 20:21]]), cache)
    assert torch.equal(step[0].argmax(-1), full_a[0, 20:21].argmax(-1))
    assert (step[0] - full_a[0, 20:21]).abs().max() <= 2e-2 * full_a.abs().max()
    assert (step[1] - full_b[0, 20:21]).abs().max() <= 2e-2 * full_b.abs().max()


def test_generate_uses_the_cache(smollm2):
    model, tok = smollm2
    qm = atom_compile.compile(model, None, "fp", tokenizer=tok, progress=False)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    ours = qm.generate(ids, max_new_tokens=8)
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, ref[:, : ours.shape[1]])
