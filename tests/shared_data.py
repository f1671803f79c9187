"""Where the tests find real text: ../shared/data, or the bundled samples for the two Wikipedia splits."""

from __future__ import annotations

from pathlib import Path

import pytest

from atom_compile.data import BUNDLED_CALIB, BUNDLED_EVAL

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def data_file(name: str) -> Path:
    """A file of ../shared/data (the project's real evaluation data); the bundled samples stand in for the
    two Wikipedia splits if ../shared is absent, and other files are skipped."""
    p = SHARED / name
    if p.is_file():
        return p
    fallback = {"enwiki_calib.txt": BUNDLED_CALIB, "enwiki_eval.txt": BUNDLED_EVAL}.get(name)
    if fallback is None:
        pytest.skip(f"{p} is not available")
    return fallback
