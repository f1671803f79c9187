"""Bad input fails early with a message that says what to do."""

import json

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM

import atom_compile
from atom_compile import AtomConfig, CalibrationDataError, ConfigError, NonFiniteActivationError
from atom_compile.models import ModelLoadError, UnsupportedArchitectureError, check_architecture, load_model


def tiny_llama(**kw):
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, **kw)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_unsupported_architecture_is_named():
    with pytest.raises(UnsupportedArchitectureError, match="model_type='gpt2'"):
        check_architecture(GPT2Config())
    model = tiny_llama()
    model.config.model_type = "falcon"
    with pytest.raises(UnsupportedArchitectureError, match="falcon"):
        atom_compile.compile(model, None, "fp")


def test_unsupported_architecture_from_a_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("data,match", [
    (None, "needs calibration data"),
    ([], "empty list"),
    ("", "empty"),
    (torch.zeros(0, 16, dtype=torch.long), "empty"),
    (torch.randn(4, 16), "integer ids"),
    (torch.zeros(16, dtype=torch.long), r"2-D \[num_samples, seq_len\].*unsqueeze"),
    (torch.zeros(2, 3, 4, dtype=torch.long), "2-D"),
    (torch.full((2, 8), 64, dtype=torch.long), "outside the vocabulary"),
    ([1, 2, 3], "must hold strings"),
    (["some text"], "needs a tokenizer"),
])
def test_bad_calibration_data(data, match):
    with pytest.raises(CalibrationDataError, match=match):
        atom_compile.compile(tiny_llama(), data, "atom-w4a4-rtn", progress=False)


def test_nan_activations_are_caught():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[3, 5] = float("nan")
    ids = torch.randint(0, 64, (2, 16))
    with pytest.raises(NonFiniteActivationError, match="NaN/Inf values in the output of layer 0"):
        atom_compile.compile(model, ids, AtomConfig(group_size=32, n_outliers=32), progress=False)
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = float("inf")
    with pytest.raises(NonFiniteActivationError, match="embeddings"):
        atom_compile.compile(model, torch.full((1, 8), 7), AtomConfig(group_size=32, n_outliers=32), progress=False)


def test_group_size_and_outliers_that_do_not_fit():
    strict = AtomConfig(group_size=100, n_outliers=128, adapt_to_model=False)
    with pytest.raises(ConfigError, match="group_size 100 does not divide the 448 normal channels"):
        strict.resolve(576)
    with pytest.raises(ConfigError, match="outlier channels do not fit"):
        AtomConfig(n_outliers=64).resolve(64)
    with pytest.raises(ConfigError, match="group_size must be an even number"):
        AtomConfig(group_size=7)
    with pytest.raises(ConfigError, match="weight_channel_group 3 does not divide|does not divide the"):
        atom_compile.compile(tiny_llama(), torch.randint(0, 64, (2, 16)),
                             AtomConfig(group_size=32, n_outliers=32, weight_channel_group=3), progress=False)
    model = tiny_llama()  # hidden 64: 32 outliers leave 32 normal channels
    with pytest.raises(ConfigError, match="group_size 64 is larger than the 32 normal channels"):
        atom_compile.compile(model, torch.randint(0, 64, (2, 16)),
                             AtomConfig(group_size=64, n_outliers=32, adapt_to_model=False), progress=False)


@pytest.mark.parametrize("knob,value,match", [
    ("weight_format", "int9", "weight_format"), ("act_clip", 1.5, "act_clip"), ("kv_bits", 3, "kv_bits"),
    ("outlier_format", "int4", "outlier_format"), ("weight_method", "awq", "weight_method"),
    ("outlier_metric", "max", "outlier_metric"),
])
def test_bad_knobs(knob, value, match):
    with pytest.raises(ConfigError, match=match):
        atom_compile.get_config("atom-w4a4", **{knob: value})
    with pytest.raises(ConfigError, match="unknown preset"):
        atom_compile.get_config("atom-w2a2")


def test_pickle_checkpoints_are_refused(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle.*safetensors"):
        load_model(str(tmp_path))


def test_missing_model_files(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_cuda_graph_decode_needs_a_capturable_model():
    """generate(cuda_graph=True) says why a model cannot be captured (here: on the CPU); the default falls back."""
    model = tiny_llama()
    q = atom_compile.compile(model, torch.randint(0, 64, (2, 16)), AtomConfig(group_size=32, n_outliers=32),
                             progress=False)
    assert "not a CUDA device" in q.can_capture_decode()
    ids = torch.randint(0, 64, (1, 4))
    with pytest.raises(ValueError, match="cannot be captured: the model is on cpu"):
        q.generate(ids, 3, cuda_graph=True)
    assert q.generate(ids, 3).shape == (1, 7)
