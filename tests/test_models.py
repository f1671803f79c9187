"""Model loading: the alias, .gguf files, local HF directories, hub ids (through a local hub cache), and
the Llama-family architectures in scope (Llama with MLP bias, Mistral, Qwen2 with q/k/v bias, GQA)."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import atom_compile
from atom_compile import AtomConfig, models
from atom_compile.models import ModelLoadError, load_model


def test_alias_resolves_to_the_bundled_gguf():
    path = Path(models.resolve_alias("smollm2-135m"))
    assert path.suffix == ".gguf" and path.is_file()


def test_gguf_is_converted_once_then_loaded_from_the_cache(smollm2, monkeypatch):
    gguf = models.resolve_alias("smollm2-135m")
    converted = models.resolve_model_dir(gguf)
    assert (Path(converted) / "model.safetensors").is_file()
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    model, tok = load_model(gguf)
    ref, _ = smollm2
    assert torch.equal(model.model.layers[3].mlp.down_proj.weight, ref.model.layers[3].mlp.down_proj.weight)


def test_local_hf_directory(smollm2):
    model, tok = load_model(models.resolve_model_dir("smollm2-135m"))
    assert model.config.model_type == "llama" and tok("hello").input_ids


def test_hub_id_through_a_local_hub_cache(tmp_path, monkeypatch):
    """The hub code path is real: a hub id resolves through huggingface_hub's cache layout, offline."""
    src = Path(models.resolve_model_dir("smollm2-135m"))
    snapshot = tmp_path / "hub" / "models--atom-test--smollm2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in src.iterdir():
        os.symlink(f, snapshot / f.name)
    (tmp_path / "hub" / "models--atom-test--smollm2" / "refs").mkdir()
    (tmp_path / "hub" / "models--atom-test--smollm2" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    model, tok = load_model("atom-test/smollm2")
    assert model.config.num_hidden_layers == 30
    with pytest.raises(ModelLoadError, match="cannot read a model config from 'atom-test/missing'"):
        load_model("atom-test/missing")


def _tiny(kind):
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    if kind == "llama-mlp-bias":
        return LlamaForCausalLM(LlamaConfig(mlp_bias=True, attention_bias=True, **common))
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=64, **common))
    return Qwen2ForCausalLM(Qwen2Config(**common))


@pytest.mark.parametrize("kind", ["llama-mlp-bias", "mistral", "qwen2"])
def test_llama_family_architectures(kind):
    model = _tiny(kind).eval()
    with torch.no_grad():  # give the biases real values (they start at zero)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    ids = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
    fp = atom_compile.compile(model, None, "fp", progress=False)
    assert (fp(ids) - ref).abs().max() < 1e-4
    # 8-bit everything with 32 reordered outliers: close to fp, which fails if a bias missed the reorder
    cfg = AtomConfig(weight_format="int8", act_format="int8", group_size=32, n_outliers=32, kv_bits=8,
                     weight_clip=1.0, act_clip=1.0)
    q = atom_compile.compile(model, torch.randint(0, 96, (4, 32)), cfg, progress=False)
    rel = ((q(ids) - ref).norm() / ref.norm()).item()
    assert rel < 0.02, rel


def test_sliding_window_limit_is_explicit():
    model = _tiny("mistral").eval()
    fp = atom_compile.compile(model, None, "fp", progress=False)
    with pytest.raises(NotImplementedError, match="sliding window"):
        fp(torch.randint(0, 96, (1, 65)))
