"""Saved quantized models: safetensors + JSON, never pickle; reloads bit-exactly.

A checkpoint directory holds:

- ``model.safetensors``: embeddings, final norm, LM head, and every layer's tensors (packed 4-bit weights,
  group scales, INT8 outlier weights and scales, norm weights, channel permutations) as ``layers.N.<name>``;
- ``atom_graphs.json``: each layer's graph after the passes (before lowering) as a list of nodes whose
  targets come from an allowlist (``atom.*`` ops, a few ``aten`` ops, ``operator`` builtins), so loading never
  executes code from the file; plus each layer's KV-cache spec;
- ``atom_config.json``: format version, the AtomConfig, the model's shape, its HF config (for the rotary
  embedding), the SHA-256 of ``model.safetensors`` and the dtype;
- the tokenizer files.

``load(dir)`` checks all of it and fails with ``CheckpointError`` naming the file and what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from atom_compile.config import AtomConfig
from atom_compile.models import ArchInfo

FORMAT = "atom-compile-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
GRAPHS = "atom_graphs.json"
CONFIG = "atom_config.json"

_BUILTINS = {"operator.getitem": operator.getitem, "operator.add": operator.add, "operator.mul": operator.mul}
_ATEN = {"aten.linear.default", "aten.silu.default", "aten.mul.Tensor", "aten.index_select.default", "aten.add.Tensor",
         "aten.slice.Tensor"}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded, with what to do about it."""


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


# ------------------------------------------------------------------------------------------ serialization
def _target_name(node: fx.Node) -> str:
    target = node.meta.get("atom.op", node.target)  # lowered nodes remember their atom op
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    for name, fn in _BUILTINS.items():
        if target is fn:
            return name
    raise CheckpointError(f"cannot save node {node.name}: its target {target} is not serializable")


def _encode(arg):
    if isinstance(arg, fx.Node):
        return {"node": arg.name}
    if isinstance(arg, torch.dtype):
        return {"dtype": str(arg).removeprefix("torch.")}
    if isinstance(arg, (tuple, list)):
        return {"list": [_encode(a) for a in arg]}
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    raise CheckpointError(f"cannot save graph argument {arg!r} of type {type(arg).__name__}")


def graph_to_json(gm: fx.GraphModule) -> dict:
    nodes = []
    for n in gm.graph.nodes:
        entry = {"name": n.name, "op": n.op}
        if n.op == "call_function":
            entry["target"] = _target_name(n)
        elif n.op == "get_attr":
            entry["target"] = n.target
        if n.op != "placeholder":
            entry["args"] = _encode(tuple(n.args))
        nodes.append(entry)
    return {"nodes": nodes, "kv_cache_spec": [list(s) for s in gm.meta["atom.kv_cache_spec"]]}


def _resolve_target(name: str):
    if name in _BUILTINS:
        return _BUILTINS[name]
    ns, op, overload = name.split(".")
    if ns == "atom" or (ns == "aten" and f"{ns}.{op}.{overload}" in _ATEN):
        packet = getattr(getattr(torch.ops, ns), op, None)
        if packet is not None and overload in packet.overloads():
            return getattr(packet, overload)
    raise CheckpointError(f"graph target {name!r} is not an allowed op")


def _decode(arg, env):
    if isinstance(arg, dict):
        if "node" in arg:
            return env[arg["node"]]
        if "dtype" in arg:
            dt = getattr(torch, arg["dtype"], None)
            if not isinstance(dt, torch.dtype):
                raise CheckpointError(f"unknown dtype {arg['dtype']!r}")
            return dt
        if "list" in arg:
            return tuple(_decode(a, env) for a in arg["list"])
        raise CheckpointError(f"malformed graph argument {arg!r}")
    return arg


def graph_from_json(data: dict, root: nn.Module) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for entry in data["nodes"]:
        op = entry["op"]
        if op == "placeholder":
            node = graph.placeholder(entry["name"])
        elif op == "get_attr":
            if not hasattr(root, entry["target"]):
                raise CheckpointError(f"graph reads tensor {entry['target']!r}, which {WEIGHTS} does not hold")
            node = graph.get_attr(entry["target"])
        elif op == "call_function":
            node = graph.call_function(_resolve_target(entry["target"]), _decode(entry["args"], env))
        elif op == "output":
            graph.output(_decode(entry["args"], env)[0])
            continue
        else:
            raise CheckpointError(f"unknown node kind {op!r}")
        node._rename(entry["name"])
        env[entry["name"]] = node
    graph.lint()
    gm = fx.GraphModule(root, graph, class_name="AtomDecoderLayer")
    gm.meta["atom.kv_cache_spec"] = [tuple(s) for s in data["kv_cache_spec"]]
    return gm


# ----------------------------------------------------------------------------------------------- save
def save(qmodel, out_dir: str | Path, source: str = "") -> dict:
    """Write ``qmodel`` (an AtomForCausalLM) to ``out_dir``; returns a summary with sizes."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"embed_tokens": qmodel.embed_weight, "norm": qmodel.norm_weight}
    tied = qmodel.lm_head_weight is qmodel.embed_weight
    if not tied:
        tensors["lm_head"] = qmodel.lm_head_weight
    graphs = []
    for i, gm in enumerate(qmodel.layers):
        for name, buf in gm.named_buffers():
            tensors[f"layers.{i}.{name}"] = buf
        graphs.append(graph_to_json(gm))
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(out / WEIGHTS))
    (out / GRAPHS).write_text(json.dumps({"layers": graphs}))
    digest = hashlib.sha256((out / WEIGHTS).read_bytes()).hexdigest()
    hf = qmodel.hf_config
    meta = {
        "format": FORMAT, "version": VERSION, "atom_config": qmodel.atom_config.to_dict(),
        "arch": dataclasses.asdict(qmodel.arch), "hf_config": hf, "dtype": str(qmodel.dtype).removeprefix("torch."),
        "tied_lm_head": tied, "sha256": {WEIGHTS: digest}, "source": source, "torch": torch.__version__,
    }
    (out / CONFIG).write_text(json.dumps(meta, indent=2))
    if qmodel.tokenizer is not None:
        qmodel.tokenizer.save_pretrained(str(out))
    layer_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith("layers."))
    other = sum(t.numel() for k, t in tensors.items() if not k.startswith("layers."))
    return {
        "bytes": (out / WEIGHTS).stat().st_size,  # everything, embeddings in the model's dtype
        "layer_bytes": layer_bytes,  # the quantized decoder layers
        "fp16_layer_bytes": 2 * _layer_params(qmodel.arch),
        "fp16_bytes": 2 * (other + _layer_params(qmodel.arch)),
    }


def _layer_params(arch: ArchInfo) -> int:
    """Parameters of the original decoder layers (what an fp16 checkpoint stores for them)."""
    H, D = arch.hidden_size, arch.head_dim
    q, kv = arch.num_heads * D, arch.num_kv_heads * D
    per_layer = H * q + 2 * H * kv + q * H + 3 * H * arch.intermediate_size + 2 * H
    if arch.attention_bias:
        per_layer += q + 2 * kv
    if arch.mlp_bias:
        per_layer += 2 * arch.intermediate_size + H
    return per_layer * arch.num_layers


# ----------------------------------------------------------------------------------------------- load
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; this is not a complete atom-compile checkpoint (re-run quantize)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); re-run atom-compile quantize") from e


def load(ckpt_dir: str | Path, device: str | torch.device = "cpu", backend: str | None = None):
    """An AtomForCausalLM from a checkpoint directory, lowered for ``device``; logits are bit-identical."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    from atom_compile.lowering import lower, pick_backend
    from atom_compile.runtime import AtomForCausalLM

    d = Path(ckpt_dir)
    meta = _read_json(d / CONFIG)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{d / CONFIG}: not an {FORMAT} v{VERSION} file (found {meta.get('format')} "
                              f"v{meta.get('version')})")
    graphs = _read_json(d / GRAPHS)
    weights = d / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; re-run atom-compile quantize")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest != meta["sha256"][WEIGHTS]:
        raise CheckpointError(f"{weights} does not match its recorded SHA-256 (truncated or corrupt); "
                              "re-run atom-compile quantize or copy the file again")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} cannot be read ({e}); re-run atom-compile quantize") from e

    try:
        cfg = AtomConfig.from_dict(meta["atom_config"])
        arch = ArchInfo(**meta["arch"])
        hf_dict = dict(meta["hf_config"])
        hf_config = AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d / CONFIG} is malformed ({e})") from e
    backend = backend or pick_backend(device)
    layers = []
    for i, g in enumerate(graphs.get("layers", [])):
        root = nn.Module()
        prefix = f"layers.{i}."
        for key, t in tensors.items():
            if key.startswith(prefix):
                root.register_buffer(key[len(prefix):], t)
        gm = graph_from_json(g, root).to(device)
        gm.meta["atom.layer_index"] = i
        layers.append(lower(gm, backend))
    if len(layers) != arch.num_layers:
        raise CheckpointError(f"{d / GRAPHS} holds {len(layers)} layers, the model has {arch.num_layers}")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    embed = tensors["embed_tokens"].to(device)
    lm_head = embed if meta["tied_lm_head"] else tensors["lm_head"].to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(d)) if (d / "tokenizer_config.json").is_file() else None
    model = AtomForCausalLM(arch, layers, embed, tensors["norm"].to(device), lm_head,
                            LlamaRotaryEmbedding(hf_config).to(device), cfg, tokenizer, meta["hf_config"])
    return model
