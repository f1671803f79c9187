"""Kernel tests run on a CUDA device when there is one, else under Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported: tests/conftest.py sets it.
"""

import pytest
import torch
import triton  # noqa: F401  (CI installs it: a missing triton must fail, not skip)


@pytest.fixture(scope="session")
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
