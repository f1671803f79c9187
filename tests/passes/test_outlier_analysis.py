import collections

import pytest
import torch

from atom_compile.passes import OutlierAnalysis
from harness import check_pass

INPUTS = ("input_layernorm", "attention", "post_attention_layernorm", "mlp_act")
HOOKED = {"q_proj": "input_layernorm", "o_proj": "attention", "gate_proj": "post_attention_layernorm",
          "down_proj": "mlp_act"}


def _hf_input_stats(real_layer):
    """Independent statistics: hooks on the HF layer's linears, run over the same calibration inputs."""
    layer, calib = real_layer["hf_layer"], real_layer["calibration"]
    sq, ab, hess, count = {}, {}, {}, 0
    hooks = []
    for lin, name in HOOKED.items():
        mod = getattr(layer.self_attn if lin in ("q_proj", "o_proj") else layer.mlp, lin)

        def hook(_m, args, _out, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sq[name] = sq.get(name, 0) + (x * x).sum(0)
            ab[name] = ab.get(name, 0) + x.abs().sum(0)
            hess[name] = hess.get(name, 0) + x.t() @ x

        hooks.append(mod.register_forward_hook(hook))
    h = calib.hidden
    pos = torch.arange(h.shape[1]).unsqueeze(0)
    with torch.no_grad():
        layer(h, position_embeddings=(calib.cos.expand(h.shape[0], -1, -1), calib.sin.expand(h.shape[0], -1, -1)),
              attention_mask=None, position_ids=pos)
    count = h.shape[0] * h.shape[1]
    for hk in hooks:
        hk.remove()
    return sq, ab, hess, count


def test_records_orders_without_touching_the_graph(layer_graph, make_ctx, real_layer):
    code = layer_graph.code
    _, after, modified = check_pass(OutlierAnalysis, layer_graph, make_ctx("atom-w4a4-rtn"), real_layer["inputs"])
    assert not modified and after.code == code
    orders = after.meta["atom.outlier_order"]
    assert set(orders) == set(INPUTS)
    for name, perm in orders.items():
        assert torch.equal(perm.sort().values, torch.arange(perm.numel())), f"{name}: not a permutation"
    nodes = {n.name: n for n in after.graph.nodes}
    assert nodes["input_layernorm"].meta["atom.n_outliers"] == 128  # 576 inputs: 128 outliers, groups of 64
    assert nodes["mlp_act"].meta["atom.n_outliers"] == 128  # 1536 inputs
    # q/k/v share one order: the order lives on their shared input node
    assert {n.args[0].name for n in after.graph.nodes if n.name in ("q_proj", "k_proj", "v_proj")} == {"input_layernorm"}


def test_scores_match_an_independent_computation(layer_graph, make_ctx, real_layer):
    from atom_compile.passes.outlier_analysis import chunk_channel_order

    sq, ab, _, count = _hf_input_stats(real_layer)
    gm = OutlierAnalysis(make_ctx("atom-w4a4-rtn")).call(layer_graph).graph_module  # (meta set in place)
    default = {n.name: n.meta["atom.channel_order"] for n in gm.graph.nodes if n.name in INPUTS}
    score_cfg = make_ctx("atom-w4a4-rtn").config.replace(channel_order="score")
    gm = OutlierAnalysis(make_ctx(score_cfg)).call(layer_graph).graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in INPUTS:
        scores = nodes[name].meta["atom.channel_scores"].double()
        torch.testing.assert_close(scores, sq[name], rtol=1e-4, atol=1e-6)
        perm = nodes[name].meta["atom.channel_order"]
        assert torch.all(scores[perm][1:] >= scores[perm][:-1]), "order is not ascending in score"
        n = nodes[name].meta["atom.n_outliers"]
        top = set(torch.topk(sq[name], n).indices.tolist())
        assert len(top & set(perm[-n:].tolist())) >= n - 1, f"{name}: outlier set differs from the top-{n} channels"
        # the default (channel_order="chunks"): the same outliers, the normal channels in score-sorted runs of 16
        g = score_cfg.resolve(perm.numel()).group_size
        assert torch.equal(default[name], chunk_channel_order(perm, n, g))

    cfg = make_ctx("atom-w4a4-rtn").config.replace(outlier_metric="abs_mean")
    gm2 = OutlierAnalysis(make_ctx(cfg)).call(layer_graph).graph_module
    nodes2 = {n.name: n for n in gm2.graph.nodes}
    for name in INPUTS:
        torch.testing.assert_close(nodes2[name].meta["atom.channel_scores"].double(), ab[name] / count,
                                   rtol=1e-4, atol=1e-7)


def test_records_input_hessians_for_gptq(layer_graph, make_ctx, real_layer):
    _, _, hess, _ = _hf_input_stats(real_layer)
    gm = OutlierAnalysis(make_ctx("atom-w4a4")).call(layer_graph).graph_module
    for name in INPUTS:
        H = gm.meta["atom.input_hessians"][name]
        torch.testing.assert_close(H, hess[name], rtol=1e-4, atol=1e-4 * hess[name].abs().max().item())


def test_nothing_to_do_without_outliers(layer_graph, make_ctx):
    result = OutlierAnalysis(make_ctx("rtn-w4a4", calibration=False)).call(layer_graph)
    assert not result.modified and result.graph_module.meta["atom.outlier_order"] == {}


def test_needs_calibration_data(layer_graph, make_ctx):
    import pytest

    with pytest.raises(ValueError, match="calibration data"):
        OutlierAnalysis(make_ctx("atom-w4a4-rtn", calibration=False)).call(layer_graph)


def test_block_channel_order():
    """The docstring's example, then random outliers at Llama's and SmolLM2's sizes: a permutation with the same
    outliers last in score order, whose normal groups are the blocks with the fewest outliers (in channel order),
    each keeping its own channels except where an outlier was: there the channels outside every chosen block that
    are not outliers, in ascending order."""
    from atom_compile.passes.outlier_analysis import block_channel_order

    assert block_channel_order(torch.tensor([0, 3, 4, 5, 7, 2, 1, 6]), 2, 2).tolist() == [0, 7, 2, 3, 4, 5, 1, 6]
    for K, g, n in ((4096, 128, 128), (576, 64, 128), (1536, 128, 128), (640, 128, 128), (576, 64, 0)):
        score_order = torch.randperm(K, generator=torch.Generator().manual_seed(K + n))
        perm = block_channel_order(score_order, n, g).tolist()
        assert sorted(perm) == list(range(K))
        assert perm[K - n:] == score_order[K - n:].tolist()
        outliers = set(perm[K - n:])
        counts = [sum(c in outliers for c in range(b * g, (b + 1) * g)) for b in range(K // g)]
        chosen = sorted(sorted(range(K // g), key=lambda b: (counts[b], b))[: (K - n) // g])
        in_chosen = {c for b in chosen for c in range(b * g, (b + 1) * g)}
        fills = [c for c in range(K) if c not in in_chosen and c not in outliers]
        expected = []
        for b in chosen:
            for c in range(b * g, (b + 1) * g):
                expected.append(fills.pop(0) if c in outliers else c)
        assert perm[: K - n] == expected
    with pytest.raises(ValueError, match="groups of 128"):
        block_channel_order(torch.arange(640), 64, 128)


def test_chunk_channel_order():
    """The docstring's example, then random outliers at Llama's and SmolLM2's sizes: a permutation with the same
    outliers last, whose normal groups are the runs of 16 with the fewest outliers, in ascending order of their
    best normal channel's score rank, placed in the group as the docstring says (4 or more runs: in pairs of runs
    per half group, [a 0-7 | b 0-7 | a 8-15 | b 8-15]; 2 runs: each run's halves at the same positions of the
    group's two halves), and the runs' outlier positions filled with the normal channels of the runs left over,
    lowest rank first."""
    from atom_compile.passes.outlier_analysis import chunk_channel_order

    example = torch.tensor([8, 9, 2, 3, 0, 10, 5, 4, 11, 7, 1, 6])
    assert chunk_channel_order(example, 4, 4, unit=2).tolist() == [8, 2, 9, 3, 0, 4, 10, 5, 11, 7, 1, 6]
    assert chunk_channel_order(example, 4, 8, unit=2).tolist() == [8, 2, 9, 3, 0, 4, 10, 5, 11, 7, 1, 6]
    u = 16
    for K, g, n in ((4096, 128, 128), (576, 64, 128), (1536, 128, 128), (576, 64, 0), (1024, 32, 64)):
        score_order = torch.randperm(K, generator=torch.Generator().manual_seed(K + n))
        perm = chunk_channel_order(score_order, n, g, unit=u)
        assert sorted(perm.tolist()) == list(range(K)) and perm[K - n:].tolist() == score_order[K - n:].tolist()
        rank = torch.empty(K, dtype=torch.long)
        rank[score_order] = torch.arange(K)
        outliers = set(perm[K - n:].tolist())
        # back to [runs, unit] (the runs of a group in rank order)
        if g // u >= 4:  # [groups, half groups, pairs, 2 parts, 2 runs, 8]
            runs = perm[: K - n].view(-1, 2, g // u // 4, 2, 2, u // 2).transpose(3, 4).reshape(-1, u)
        else:  # [groups, 2 half groups (the parts), runs, 8]
            runs = perm[: K - n].view(-1, 2, g // u, u // 2).transpose(1, 2).reshape(-1, u)
        starts = []
        for run in runs.tolist():
            start = collections.Counter(c - j for j, c in enumerate(run)).most_common(1)[0][0]
            assert start % u == 0
            for j, c in enumerate(run):  # a swapped position held an outlier of the run
                assert c == start + j or (start + j in outliers and c not in outliers)
            starts.append(start)
        counts = {r: sum(c in outliers for c in range(r * u, (r + 1) * u)) for r in range(K // u)}
        kept = sorted(range(K // u), key=lambda r: (counts[r], r))[: (K - n) // u]
        assert sorted(s // u for s in starts) == sorted(kept)
        best = [max((int(rank[c]) for c in range(s, s + u) if c not in outliers), default=-1) for s in starts]
        assert best == sorted(best)
        fills = [c for r, run in zip(starts, runs.tolist()) for j, c in enumerate(run) if c != r + j]
        assert [int(rank[c]) for c in fills] == sorted(int(rank[c]) for c in fills)
    with pytest.raises(ValueError, match="groups of 128"):
        chunk_channel_order(torch.arange(640), 64, 128)
