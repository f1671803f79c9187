"""What a backend binds an op node to."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch.fx as fx


@dataclasses.dataclass(frozen=True)
class Binding:
    """An implementation of one ``atom`` op: ``fn`` replaces the node's target and takes the op's arguments."""

    fn: Callable
    name: str
    config: str = ""

    def bind(self, gm: fx.GraphModule, node: fx.Node) -> tuple[Callable, str, str]:
        """(callable, implementation name, launch configuration) for this node. Backends override this to
        check the node's formats, prepare weights once (lowering time) or fall back to the reference."""
        return self.fn, self.name, self.config
