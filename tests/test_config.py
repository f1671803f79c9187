import pytest

from atom_compile import PRESETS, AtomConfig, ConfigError, get_config


@pytest.mark.parametrize("K,group,n,expect", [
    (576, 128, 128, (64, 128)),    # SmolLM2 hidden: 128 outliers kept, 7 groups of 64
    (1536, 128, 128, (128, 128)),  # SmolLM2 intermediate: fits as asked
    (4096, 128, 128, (128, 128)),  # Llama-7B hidden
    (11008, 128, 128, (128, 128)),  # Llama-7B intermediate
    (896, 128, 128, (128, 128)),   # Qwen2-0.5B hidden
    (576, 64, 64, (64, 64)),       # the reference setup of issue 4
    (576, 128, 0, (64, 0)),        # no outliers: the group halves to 64
    (600, 128, 128, (128, 88)),    # 472 = 8 * 59: no group >= 32 fits, so 40 outliers go
    (576, None, 0, (576, 0)),      # one group per row
])
def test_adaptation_rule(K, group, n, expect):
    spec = AtomConfig(group_size=group, n_outliers=n).resolve(K)
    assert (spec.group_size, spec.n_outliers) == expect
    assert spec.n_normal % spec.group_size == 0


def test_every_knob_is_settable_on_its_own():
    base = get_config("atom-w4a4")
    for knob, value in [("weight_format", "int3"), ("act_format", "int8"), ("group_size", 64), ("n_outliers", 32),
                        ("outlier_format", "fp16"), ("outlier_metric", "abs_mean"), ("weight_clip", 1.0),
                        ("act_clip", 0.8), ("kv_bits", 8), ("kv_clip", 0.95), ("weight_method", "rtn"),
                        ("weight_channel_group", 4), ("gptq_percdamp", 0.1)]:
        cfg = base.replace(**{knob: value})
        assert getattr(cfg, knob) == value
        changed = {k for k in cfg.to_dict() if cfg.to_dict()[k] != base.to_dict()[k]}
        assert changed == {knob}


def test_presets():
    assert set(PRESETS) >= {"fp", "rtn-w4a4", "w8a8", "w4a16", "atom-w4a4", "atom-w4a4-rtn"}
    rtn = PRESETS["rtn-w4a4"]
    assert rtn.group_size is None and rtn.n_outliers == 0 and rtn.kv_bits is None
    atom = PRESETS["atom-w4a4"]
    assert (atom.group_size, atom.n_outliers, atom.outlier_format, atom.kv_bits) == (128, 128, "int8", 4)
    assert (atom.weight_clip, atom.act_clip, atom.weight_method) == (0.85, 0.9, "gptq")
    assert AtomConfig.from_dict(atom.to_dict()) == atom
    with pytest.raises(ConfigError, match="unknown AtomConfig keys"):
        AtomConfig.from_dict({"bits": 4})
