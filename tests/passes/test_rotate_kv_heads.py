import dataclasses

import pytest
import torch

from atom_compile.passes import RotateKVHeads
from harness import check_pass, run_prefix


def test_rotation_preserves_the_layer(layer_graph, make_ctx, real_layer):
    ctx = make_ctx(make_ctx("fp").config.replace(kv_rotation=True), calibration=False)
    gm = run_prefix(layer_graph, ctx, RotateKVHeads)
    w_v = gm.v_proj_weight.clone()
    _, after, modified = check_pass(RotateKVHeads, gm, ctx, real_layer["inputs"],
                                    ops_before={"atom.hadamard_heads": 0}, ops_after={"atom.hadamard_heads": 2})
    assert modified
    users = {n.name: [u.name for u in n.users] for n in after.graph.nodes}
    assert users["q_rope"] == ["q_rot"] and users["k_rope"] == ["k_rot"]
    assert "kv_lens" in users["k_rot"] and "attention" in users["q_rot"]
    # V's rotation lives in the weights: each head's rows are H @ W_h, an orthonormal change of basis
    assert not torch.allclose(after.v_proj_weight, w_v)
    torch.testing.assert_close(after.v_proj_weight.double().norm(), w_v.double().norm(), rtol=1e-6, atol=0)


def test_off_unless_asked(layer_graph, make_ctx):
    """Off by default and in the presets without a 4-bit KV cache; on in the atom presets."""
    assert not RotateKVHeads(make_ctx("w8a8", calibration=False)).call(layer_graph).modified
    cfg = make_ctx("atom-w4a4-rtn").config
    assert cfg.kv_rotation
    assert not RotateKVHeads(make_ctx(cfg.replace(kv_rotation=False), calibration=False)).call(layer_graph).modified


def test_skipped_with_a_warning_where_head_dim_is_not_a_power_of_two(layer_graph, make_ctx):
    ctx = make_ctx(make_ctx("fp").config.replace(kv_rotation=True), calibration=False)
    ctx.arch = dataclasses.replace(ctx.arch, head_dim=48)
    with pytest.warns(UserWarning, match="head_dim 48 is not a power of two"):
        assert not RotateKVHeads(ctx).call(layer_graph).modified
