"""What every pass shares: the ``AtomPass`` base class and the ``PassContext`` it runs in."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from atom_compile.calibration import LayerCalibration
from atom_compile.config import AtomConfig
from atom_compile.models import ArchInfo

aten = torch.ops.aten
atom = torch.ops.atom

__all__ = ["AtomPass", "PassContext", "PassResult", "linear_nodes", "set_attr_tensor", "get_attr_tensor",
           "joined_name"]


@dataclasses.dataclass
class PassContext:
    """What a pass may read besides the graph: the config, the model's shape, calibration inputs."""

    config: AtomConfig
    arch: ArchInfo
    calibration: LayerCalibration | None = None


class AtomPass(PassBase):
    """A graph rewrite with declared facts.

    ``requires``: facts that earlier passes must provide (checked by the pipeline before anything runs).
    ``provides``: facts this pass establishes. ``call(gm)`` rewrites ``gm`` in place and returns
    ``PassResult(gm, modified)`` with an honest ``modified``.
    """

    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, ctx: PassContext):
        super().__init__()
        self.ctx = ctx

    @property
    def name(self) -> str:
        return self.__class__.__name__

    def call(self, gm: fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError


def linear_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Float ``aten.linear`` nodes whose weight is a graph attribute (the quantization candidates)."""
    return [
        n for n in gm.graph.nodes
        if n.op == "call_function" and n.target == aten.linear.default and n.args[1].op == "get_attr"
    ]


def get_attr_tensor(gm: fx.GraphModule, node_or_name) -> torch.Tensor:
    name = node_or_name.target if isinstance(node_or_name, fx.Node) else node_or_name
    return getattr(gm, name)


def set_attr_tensor(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    """Replace or add a tensor attribute (registered as a buffer so that .to(device) moves it)."""
    if hasattr(gm, name) and name not in gm._buffers:
        delattr(gm, name)
    gm.register_buffer(name, value)


def add_attr(gm: fx.GraphModule, before: fx.Node, name: str, value: torch.Tensor) -> fx.Node:
    """Register ``value`` as ``gm.<name>`` and return a get_attr node for it, placed before ``before``."""
    set_attr_tensor(gm, name, value)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def delete_attr_if_unused(gm: fx.GraphModule, name: str) -> None:
    if not any(n.op == "get_attr" and n.target == name for n in gm.graph.nodes) and hasattr(gm, name):
        delattr(gm, name)


def joined_name(names: list[str]) -> str:
    """The name of a node that does the work of ``names``: their stems joined, the shared suffix kept (no separator
    between one-letter stems): qkv_proj for q/k/v_proj, gate_up_proj for gate/up_proj, qk_rope for q/k_rope."""
    stems, _, suffix = zip(*(n.partition("_") for n in names))
    if len(set(suffix)) == 1 and suffix[0]:
        return ("" if all(len(s) == 1 for s in stems) else "_").join(stems) + "_" + suffix[0]
    return "_".join(names)
