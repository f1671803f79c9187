"""``compile``: capture each decoder layer, run the pass pipeline on it, lower it, and assemble the model."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from atom_compile.calibration import LayerCalibration, check_finite
from atom_compile.capture import capture_layer
from atom_compile.config import AtomConfig, get_config
from atom_compile.data import prepare_calibration
from atom_compile.instruments import DumpGraphs, VerifyGraph
from atom_compile.lowering import lower, pick_backend, relower
from atom_compile.models import check_architecture
from atom_compile.passes import PassContext
from atom_compile.pipeline import run_pipeline
from atom_compile.runtime import AtomForCausalLM


def compile(
    model,
    calib_data=None,
    config: str | AtomConfig = "atom-w4a4",
    dump_dir: str | Path | None = None,
    *,
    tokenizer=None,
    calib_seqlen: int = 512,
    calib_samples: int = 128,
    calib_batch_size: int = 8,
    dump_layers: set[int] | None = None,
    verify: bool = False,
    backend: str | None = None,
    progress: bool = True,
) -> AtomForCausalLM:
    """Quantize a Hugging Face Llama-family causal LM with Atom and return a module on low-bit ops.

    Args:
        model: a ``LlamaForCausalLM``-like model (Llama, Mistral, Qwen2); it is not modified.
        calib_data: token ids [num_samples, seq_len], or text (str or list of str) with ``tokenizer``.
            Needed when the config has outliers or uses GPTQ; validated whenever it is given.
        config: a preset name (``fp``, ``rtn-w4a4``, ``w8a8``, ``w4a16``, ``atom-w4a4``, ...) or an AtomConfig.
        dump_dir: write one readable file per pass per layer (``dump_layers`` picks layers) and the
            lowered graph with its kernel table.
        verify: check graph invariants after every pass (lint, shapes, permutations, fusion, KV dtypes).
        backend: ``reference`` or ``triton``; default: triton on CUDA, reference elsewhere.
    """
    cfg = get_config(config)
    arch = check_architecture(model.config)
    device = next(model.parameters()).device
    backend = backend or pick_backend(device)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "atom_tokenizer", None)
    decoder = model.model

    calibration = None
    if calib_data is not None or cfg.needs_calibration:
        ids = prepare_calibration(calib_data, tokenizer, arch.vocab_size, calib_seqlen, calib_samples)
        if cfg.needs_calibration:
            calibration = _embed_calibration(decoder, ids.to(device), arch, calib_batch_size)

    instruments = []
    if dump_dir is not None:
        instruments.append(DumpGraphs(dump_dir, dump_layers))
    if verify:
        instruments.append(VerifyGraph())

    layers = []
    bar = tqdm(decoder.layers, desc=f"compile {cfg.name}", disable=not progress)
    for index, hf_layer in enumerate(bar):
        gm = capture_layer(hf_layer, arch, index)
        ctx = PassContext(cfg, arch, calibration)
        gm = run_pipeline(gm, ctx, instruments)
        start = time.perf_counter()
        gm = lower(gm, backend)
        for inst in instruments:
            inst.after_lowering(gm, time.perf_counter() - start, ctx)
        if calibration is not None and index + 1 < len(decoder.layers):
            if backend == "reference":  # same quantized layer, float GEMMs: 2-3x faster (lowering/dequant.py)
                calibration.advance(relower(gm, "dequant"), index)
                gm = relower(gm, backend)
            else:
                calibration.advance(gm, index)
        layers.append(gm)

    return AtomForCausalLM(
        arch=arch,
        layers=layers,
        embed_weight=decoder.embed_tokens.weight.detach(),
        norm_weight=decoder.norm.weight.detach(),
        lm_head_weight=model.lm_head.weight.detach(),
        rotary_emb=decoder.rotary_emb,
        config=cfg,
        tokenizer=tokenizer,
        hf_config=model.config.to_dict(),
    )


@torch.no_grad()
def _embed_calibration(decoder, ids: torch.Tensor, arch, batch_size: int) -> LayerCalibration:
    hidden = decoder.embed_tokens(ids)
    check_finite(hidden, "the embeddings of the calibration tokens")
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    cos, sin = decoder.rotary_emb(hidden[:1], positions)
    return LayerCalibration(hidden, cos, sin, arch.num_kv_heads, batch_size)
