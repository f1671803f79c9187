"""Shared fixtures: the real SmolLM2-135M, real text, and one real decoder layer with real inputs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # kernels run under Triton's CPU interpreter; set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))  # harness.py, fake_quant.py

import atom_compile  # noqa: E402
from atom_compile.calibration import LayerCalibration  # noqa: E402
from atom_compile.capture import capture_layer  # noqa: E402
from atom_compile.data import read_text, tokenize, windows  # noqa: E402
from atom_compile.models import check_architecture  # noqa: E402
from atom_compile.passes import PassContext  # noqa: E402
from harness import LayerInputs  # noqa: E402
from shared_data import data_file  # noqa: E402

LAYER = 2  # the decoder layer the pass tests rewrite (real inputs from the fp model's layers 0-1)


@pytest.fixture(scope="session")
def smollm2():
    model, tok = atom_compile.load_model("smollm2-135m")
    return model, tok


@pytest.fixture(scope="session")
def smollm2_f64(smollm2):
    """The same model in float64: where a 4-bit model's float32 rounding would flip codes now and then and
    move its logits by whole quantization steps, float64 lets two paths be compared to 1e-9."""
    import copy

    return copy.deepcopy(smollm2[0]).double(), smollm2[1]


@pytest.fixture(scope="session")
def arch(smollm2):
    return check_architecture(smollm2[0].config)


@pytest.fixture(scope="session")
def calib_text():
    return read_text(data_file("enwiki_calib.txt"))


@pytest.fixture(scope="session")
def eval_ids(smollm2):
    return tokenize(read_text(data_file("enwiki_eval.txt"))[:200_000], smollm2[1])


def _layer_inputs(model, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model.model(ids, output_hidden_states=True)
        hidden = out.hidden_states[layer]
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        cos, sin = model.model.rotary_emb(hidden, pos)
    return hidden, cos.expand(ids.shape[0], -1, -1), sin.expand(ids.shape[0], -1, -1)


@pytest.fixture(scope="session")
def real_layer(smollm2, arch, calib_text, eval_ids):
    """Layer LAYER of SmolLM2 with real calibration inputs (4 x 128 tokens of enwiki_calib) and real
    evaluation inputs (2 x 64 tokens of enwiki_eval), both as the fp model's earlier layers compute them."""
    model, tok = smollm2
    calib_ids = windows(tokenize(calib_text[:100_000], tok), 128, 4, seed=0)
    h, cos, sin = _layer_inputs(model, calib_ids, LAYER)
    calibration = LayerCalibration(h, cos[:1], sin[:1], arch.num_kv_heads, batch_size=4)
    eh, ecos, esin = _layer_inputs(model, windows(eval_ids, 64, 2), LAYER)
    return {
        "hf_layer": model.model.layers[LAYER],
        "calibration": calibration,
        "inputs": LayerInputs(eh, ecos, esin, arch.num_kv_heads),
    }


@pytest.fixture
def layer_graph(real_layer, arch):
    """A fresh capture of the real layer."""
    return capture_layer(real_layer["hf_layer"], arch, LAYER)


@pytest.fixture
def make_ctx(real_layer, arch):
    def make(config, calibration=True):
        cfg = atom_compile.get_config(config) if isinstance(config, str) else config
        return PassContext(cfg, arch, real_layer["calibration"] if calibration else None)

    return make
