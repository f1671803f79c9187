"""atom-compile: Atom W4A4 quantization (Zhao et al., MLSys 2024) as a torch.fx pass pipeline.

    import atom_compile
    model, tok = atom_compile.load_model("smollm2-135m")
    qmodel = atom_compile.compile(model, ["some calibration text ..."], "atom-w4a4", tokenizer=tok)
    logits = qmodel(input_ids)
"""

from atom_compile import ops  # noqa: F401  (registers torch.ops.atom before anything traces)
from atom_compile.calibration import NonFiniteActivationError
from atom_compile.checkpoint import CheckpointError, load, save
from atom_compile.compiler import compile
from atom_compile.config import PRESETS, AtomConfig, ConfigError, get_config
from atom_compile.data import CalibrationDataError
from atom_compile.models import ModelLoadError, UnsupportedArchitectureError, load_model
from atom_compile.runtime import AtomForCausalLM

__version__ = "0.1.0"

__all__ = [
    "compile", "load", "save", "CheckpointError", "load_model", "AtomConfig", "PRESETS", "get_config", "AtomForCausalLM", "ConfigError",
    "CalibrationDataError", "NonFiniteActivationError", "ModelLoadError", "UnsupportedArchitectureError",
]
