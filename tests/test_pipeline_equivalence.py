"""Every prefix of the pipeline on one real layer: each stage against the previous one, under its pass's rule."""

import copy

import pytest

from atom_compile.instruments import VerifyGraph
from atom_compile.lowering import lower
from atom_compile.pipeline import PIPELINE, PipelineError, check_chain, run_pipeline
from harness import RULES, compare, run_layer

import torch


@pytest.mark.parametrize("config", ["atom-w4a4-rtn", "atom-w4a4-rtn-kv_rotation", "rtn-w4a4", "w8a8", "w4a16", "fp"])
def test_every_prefix(layer_graph, make_ctx, real_layer, config):
    """``-kv_rotation``: the preset with that knob turned off (the paper's exact KV cache)."""
    name, _, knob = config.partition("-kv_")
    cfg = make_ctx(name).config.replace(**({"kv_" + knob: False} if knob else {}))
    ctx = make_ctx(cfg, calibration=config.startswith("atom"))
    gm = layer_graph
    verify = VerifyGraph()
    verify.before_pipeline(gm, ctx)
    for cls in PIPELINE:
        before = copy.deepcopy(gm)
        result = cls(ctx).call(gm)
        gm = result.graph_module
        verify.after_pass(0, cls(ctx), gm, result.modified, None, 0.0, ctx)
        if result.modified:
            compare(RULES[cls.__name__], before, gm, real_layer["inputs"], ctx)
        else:
            assert before.code == gm.code
    # lowering binds implementations without changing the results
    before = copy.deepcopy(gm)
    lowered = lower(gm, "reference")
    assert torch.equal(run_layer(lowered, real_layer["inputs"]), run_layer(before, real_layer["inputs"]))
    assert all(not isinstance(n.target, torch._ops.OpOverload) or n.target.namespace != "atom"
               for n in lowered.graph.nodes), "an atom op was left unbound"
    assert len(lowered.meta["atom.kernel_table"]) > 0


def test_chain_check_names_both_passes():
    bad = [p for p in PIPELINE if p.__name__ != "OutlierAnalysis"]
    with pytest.raises(PipelineError, match="ReorderChannels requires 'outlier_order'.*OutlierAnalysis"):
        check_chain(bad)
    names = [p.__name__ for p in PIPELINE]
    swapped = list(PIPELINE)
    i, j = names.index("ReorderChannels"), names.index("InsertQuantNodes")
    swapped[i], swapped[j] = swapped[j], swapped[i]
    with pytest.raises(PipelineError, match="InsertQuantNodes requires 'reordered'"):
        check_chain(swapped)


def test_pass_errors_name_the_passes_that_ran(layer_graph, make_ctx, monkeypatch):
    from atom_compile.passes import FuseQuantIntoNorm

    def boom(self, gm):
        raise RuntimeError("synthetic failure")

    monkeypatch.setattr(FuseQuantIntoNorm, "call", boom)
    with pytest.raises(PipelineError, match=r"FuseQuantIntoNorm failed on layer 2 after \['RotateKVHeads', "
                                            r"'OutlierAnalysis', 'ReorderChannels', 'InsertQuantNodes'\]"):
        run_pipeline(layer_graph, make_ctx("atom-w4a4-rtn"))
