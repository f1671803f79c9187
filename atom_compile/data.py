"""Calibration and evaluation tokens: validation with clear errors, text windows, bundled sample texts."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

DATA_DIR = Path(__file__).parent / "data"
BUNDLED_CALIB = DATA_DIR / "wiki_calib_sample.txt"
BUNDLED_EVAL = DATA_DIR / "wiki_eval_sample.txt"


class CalibrationDataError(ValueError):
    """Calibration data that cannot be used, with what to do about it."""


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise CalibrationDataError(f"text file {p} is empty")
    return text


def tokenize(text: str, tokenizer) -> Tensor:
    """The token ids of a whole text, 1-D int64, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids.to(torch.int64)


def windows(ids: Tensor, seqlen: int, n: int | None = None, seed: int | None = None) -> Tensor:
    """[n, seqlen] windows of a token stream.

    ``seed=None``: consecutive non-overlapping windows from the start (evaluation).
    ``seed=int``: ``n`` windows at random starts (GPTQ-style calibration sampling).
    """
    total = ids.numel()
    if total < seqlen + 1:
        raise CalibrationDataError(f"the text has {total} tokens, fewer than one window of {seqlen}")
    if seed is None:
        count = total // seqlen if n is None else min(n, total // seqlen)
        return ids[: count * seqlen].view(count, seqlen).clone()
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen, (n,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def prepare_calibration(calib_data, tokenizer, vocab_size: int, seqlen: int, n_samples: int, seed: int = 0) -> Tensor:
    """Validate calibration data and return token windows [N, L] (int64).

    Accepts a [N, L] integer tensor, or text (a string or a list of strings) together with a tokenizer.
    """
    if calib_data is None:
        raise CalibrationDataError(
            "this configuration needs calibration data (outlier analysis or GPTQ): pass token ids "
            "[num_samples, seq_len] or a list of strings with tokenizer=..."
        )
    if isinstance(calib_data, str):
        calib_data = [calib_data]
    if isinstance(calib_data, (list, tuple)):
        if len(calib_data) == 0:
            raise CalibrationDataError("calibration data is an empty list")
        if not all(isinstance(t, str) for t in calib_data):
            raise CalibrationDataError(
                "a calibration list must hold strings (with tokenizer=...); for token ids pass one "
                "[num_samples, seq_len] integer tensor"
            )
        text = "\n\n".join(calib_data)
        if not text.strip():
            raise CalibrationDataError("calibration text is empty")
        if tokenizer is None:
            raise CalibrationDataError("calibration text needs a tokenizer: compile(..., tokenizer=tok)")
        ids = tokenize(text, tokenizer)
        if ids.numel() < seqlen + 1:
            warnings.warn(f"calibration text has {ids.numel()} tokens, less than one window of {seqlen}; "
                          f"using {n_samples} windows of {max(2, ids.numel() - 1)} tokens")
            seqlen = max(2, ids.numel() - 1)
        calib_data = windows(ids, seqlen, n_samples, seed=seed)
    if not isinstance(calib_data, Tensor):
        raise CalibrationDataError(
            f"calibration data must be a token tensor or a list of strings, got {type(calib_data).__name__}"
        )
    t = calib_data
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise CalibrationDataError(
            f"calibration tokens must be integer ids, got dtype {t.dtype} (did you pass embeddings?)"
        )
    if t.dim() != 2:
        raise CalibrationDataError(
            f"calibration tokens must be 2-D [num_samples, seq_len], got shape {tuple(t.shape)}"
            + (" (use ids.unsqueeze(0) for one sequence)" if t.dim() == 1 else "")
        )
    if t.numel() == 0:
        raise CalibrationDataError(f"calibration tokens are empty (shape {tuple(t.shape)})")
    if t.shape[1] < 2:
        raise CalibrationDataError("calibration sequences need at least 2 tokens")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab_size:
        raise CalibrationDataError(f"calibration token ids span [{lo}, {hi}], outside the vocabulary [0, {vocab_size})")
    return t.to(torch.int64)
