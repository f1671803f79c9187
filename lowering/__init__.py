"""Lowering: bind every ``atom`` op node of a layer graph to an implementation for its device."""

from .lower import BACKENDS, LoweringError, lower, pick_backend, relower

__all__ = ["BACKENDS", "LoweringError", "lower", "pick_backend", "relower"]
