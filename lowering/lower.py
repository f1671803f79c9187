"""The lowering stage (after the passes, as in TorchInductor): ``atom`` op nodes -> implementations.

    Before: %q_proj = atom.quant_linear(%xq0, ..., "int4", "int4", 128, "int8", 1, float32)
    After:  %q_proj = atom_compile_ops_quant_linear_reference(%xq0, ...)       # backend "reference"
            %q_proj = atom_compile_runtime_kernels_w4a4_gemm(%xq0, ...)        # backend "triton" (CUDA)

The kernel table (``gm.meta["atom.kernel_table"]``) lists each bound node with its implementation
and launch configuration; the dump writes it next to the lowered graph.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .binding import Binding


class LoweringError(RuntimeError):
    """No implementation of an op for the chosen backend."""


def _backend_bindings(name: str) -> dict:
    if name == "reference":
        from .reference import BINDINGS

        return BINDINGS
    if name == "triton":
        from .triton import BINDINGS

        return BINDINGS
    if name == "dequant":
        from .dequant import BINDINGS

        return BINDINGS
    raise LoweringError(f"unknown backend {name!r}; backends: {', '.join(BACKENDS)}")


BACKENDS = ("reference", "triton", "dequant")


def pick_backend(device: torch.device | str) -> str:
    """'triton' on a CUDA device where Triton is installed, else 'reference'."""
    if torch.device(device).type == "cuda":
        try:
            import triton  # noqa: F401

            return "triton"
        except ImportError:
            return "reference"
    return "reference"


def lower(gm: fx.GraphModule, backend: str = "reference") -> fx.GraphModule:
    """Bind every ``atom`` op node in place; return the graph module with its kernel table in meta."""
    bindings: dict[torch._ops.OpOverload, Binding] = _backend_bindings(backend)
    table = []
    for node in list(gm.graph.nodes):
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target.namespace != "atom":
            continue
        binding = bindings.get(target)
        if binding is None:
            raise LoweringError(f"backend {backend!r} has no implementation of {target} (node {node.name})")
        fn, name, config = binding.bind(gm, node)
        node.meta["atom.op"] = target  # what the node computes, kept for checkpoints and re-lowering
        node.meta["atom.binding"] = name
        node.target = fn
        table.append((node.name, f"atom.{target._schema.name.split('::')[-1]}", name, config))
    gm.meta["atom.kernel_table"] = table
    gm.meta["atom.backend"] = backend
    gm.graph.lint()
    gm.recompile()
    return gm


def relower(gm: fx.GraphModule, backend: str) -> fx.GraphModule:
    """Lower an already lowered graph module again, for another backend (in place)."""
    for node in gm.graph.nodes:
        if "atom.op" in node.meta:
            node.target = node.meta["atom.op"]
            node.meta.pop("atom.x16", None)
    return lower(gm, backend)
