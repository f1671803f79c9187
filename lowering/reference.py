"""The reference backend: every ``atom`` op bound to its plain-PyTorch implementation (any device)."""

from __future__ import annotations

from atom_compile.ops import REFERENCE_IMPLS

from .binding import Binding

BINDINGS = {
    op: Binding(fn, f"reference:{fn.__name__}", "plain PyTorch, exact integer semantics")
    for op, fn in REFERENCE_IMPLS.items()
}
