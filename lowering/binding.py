"""What a backend binds an op to."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Binding:
    """An implementation of one ``atom`` op.

    ``fn`` replaces the node's target and takes the op's arguments. ``prepare(gm, node)``, if given,
    runs once at lowering time (for example to lay weights out for a kernel) and may rewrite the
    node's arguments. ``describe(node)`` tells the kernel table the launch configuration.
    """

    fn: Callable
    name: str
    config: str = ""
    prepare: Callable | None = None
    describe: Callable | None = None
