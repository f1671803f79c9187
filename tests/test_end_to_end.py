"""The whole compiler on SmolLM2-135M and real text: fp exactness, the RTN collapse, Atom's accuracy,
and agreement with an independent implementation of the same algorithm."""

import copy

import pytest
import torch

import atom_compile
from atom_compile.data import tokenize, windows
from atom_compile.evaluate import perplexity
from independent_atom import simulate_atom


@pytest.fixture(scope="module")
def eval_windows(eval_ids):
    return windows(eval_ids, 256, 4)  # 1024 real tokens of enwiki_eval


@pytest.fixture(scope="module")
def calib_ids(smollm2, calib_text):
    return windows(tokenize(calib_text, smollm2[1]), 256, 8, seed=0)


@pytest.fixture(scope="module")
def fp_ppl(smollm2, eval_windows):
    return perplexity(lambda x: smollm2[0](x).logits, eval_windows, progress=False)["ppl"]


def test_fp_matches_transformers(smollm2, eval_windows, fp_ppl):
    model, _ = smollm2
    ours = perplexity(atom_compile.compile(model, None, "fp", progress=False), eval_windows, progress=False)["ppl"]
    assert abs(ours / fp_ppl - 1) < 1e-3, (ours, fp_ppl)


def test_rtn_w4a4_collapses(smollm2, eval_windows, fp_ppl):
    ppl = perplexity(atom_compile.compile(smollm2[0], None, "rtn-w4a4", progress=False), eval_windows,
                     progress=False)["ppl"]
    assert ppl > 100 * fp_ppl, (ppl, fp_ppl)


GRAPH_INPUTS = {"input_layernorm": "qkv", "attention": "o", "post_attention_layernorm": "gu", "mlp_act": "down"}


@pytest.fixture(scope="module")
def atom_rtn(smollm2, calib_ids):
    return atom_compile.compile(smollm2[0], calib_ids, "atom-w4a4-rtn", progress=False)


def test_outlier_orders_agree_with_an_independent_implementation(smollm2, calib_ids, atom_rtn):
    """Where both see identical inputs (layer 0), the orders are identical. Later layers see inputs that
    differ by float rounding inside the quantized earlier layers, which reorders near-tied normal channels."""
    ours = {k: atom_rtn.layers[0].meta["atom.outlier_order"][g] for g, k in GRAPH_INPUTS.items()}
    _, theirs = simulate_atom(copy.deepcopy(smollm2[0]), calib_ids, atom_rtn.atom_config, max_layers=1)
    for key, perm in ours.items():
        assert torch.equal(perm, theirs[0][key]), key


def test_atom_agrees_with_an_independent_implementation_and_stays_close_to_fp(smollm2, eval_windows, eval_ids,
                                                                             atom_rtn):
    """Given the same outlier orders, an independent fake-quant simulation on the HF model (hooks, its own
    quantizer code and Hadamard matrix, K after RoPE) computes the same function.

    Sharp check, layer by layer: each of our layers, fed the simulation's input to that layer, gives the
    simulation's output. Both round to the same codes except where float summation order puts a value
    within an ulp of a rounding boundary; such a flip moves one value by a whole 4-bit step, and a flipped
    K code of an early token reaches every later token of that layer. Measured over the 30 layers on 256
    tokens: relative error median 8.6e-5, worst 1.6e-3 (score order), layers without a flip 5e-8; the same simulation
    with the KV cache unrotated (a different algorithm) misses by a median of 2.2e-2. End to end, flips
    compound over 30 layers, so the perplexities agree only to a noise floor that shrinks with the number
    of tokens: measured 0.3% to 4.0% on 1,024 tokens (across configs, compiles and texts; 4.0% with the
    bundled text), 3.5% on 2,048 and 1.3% on 4,096 for that same case. Bounded at 3% on 4,096 tokens.
    """
    orders = {i: {k: gm.meta["atom.outlier_order"][g] for g, k in GRAPH_INPUTS.items()}
              for i, gm in enumerate(atom_rtn.layers)}
    cfg = atom_rtn.atom_config
    assert cfg.kv_rotation and cfg.kv_bits == 4
    sim, _ = simulate_atom(copy.deepcopy(smollm2[0]), None, cfg, orders=orders)
    errors = _layer_errors(atom_rtn, sim, eval_windows[:1])
    # (max: one flipped code can move a layer by ~1e-2. Measured per window of 256 tokens, layer by layer, 2026-11-22:
    # with the score order max 3.4e-3 / 8.3e-3 / 3.4e-3 (median <= 8e-6), with the chunk order (the default)
    # 1.4e-2 (layer 0 of the first window; 2.5e-7 and 7.4e-6 on the next two) / 2.4e-3 / 2.3e-3 (median <= 7e-5).
    # In float64 that layer-0 error stays (1.3e-2, median 2e-8): one INT8 outlier code of the input norm's output
    # (token 75) sits at 82.50000067 scales in float64 (ours: 83), and the simulation normalizes with transformers'
    # RMSNorm, which computes in float32 even for a float64 model: its value and its row's scale put it on the
    # other side of the tie (82). A near-tie flip, not a rule that differs.
    # bench/adhoc/diag_e2e_layer_errors.py and diag_e2e_tie.py, outputs next to them.)
    assert errors.median() < 1e-3 and errors.max() < 2e-2, errors
    # the check tells algorithms apart: the same simulation with the paper's unrotated KV cache fails it
    other, _ = simulate_atom(copy.deepcopy(smollm2[0]), None, cfg.replace(kv_rotation=False), orders=orders)
    assert _layer_errors(atom_rtn, other, eval_windows[:1]).median() > 1e-2  # measured: 2.2e-2
    long_windows = windows(eval_ids, 256, 16)  # 4,096 tokens: flips average out
    ours = perplexity(atom_rtn, long_windows, progress=False)["ppl"]
    theirs = perplexity(lambda x: sim(x).logits, long_windows, progress=False)["ppl"]
    assert abs(ours / theirs - 1) < 3e-2, (ours, theirs)
    fp_long = perplexity(lambda x: smollm2[0](x).logits, long_windows, progress=False)["ppl"]
    assert ours < 1.5 * fp_long, (ours, fp_long)


def _layer_errors(qmodel, sim, x):
    """Relative error of each of our layers, fed the simulation's input to that layer, against its output."""
    seen = {}
    hooks = [layer.register_forward_hook(
        lambda _m, args, kwargs, out, i=i: seen.__setitem__(i, (kwargs.get("hidden_states", args[0] if args else None),
                                                                out[0] if isinstance(out, tuple) else out)),
        with_kwargs=True) for i, layer in enumerate(sim.model.layers)]
    with torch.no_grad():
        sim(x)
    for h in hooks:
        h.remove()
    errors = []
    positions = torch.arange(x.shape[1]).unsqueeze(0)
    for i, layer in enumerate(qmodel.layers):
        hidden, expected = seen[i]
        cache = qmodel.new_cache(1, x.shape[1])
        cos, sin = qmodel.rotary(hidden, positions)
        ours = layer(hidden, cos, sin, cache.seqlens, *cache.layers[i])
        errors.append(float((ours - expected).norm() / expected.norm()))
    return torch.tensor(errors)
