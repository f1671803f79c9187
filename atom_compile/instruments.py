"""Pipeline instruments (as TVM's PassContext instruments): graph dumps and verification between passes."""

from __future__ import annotations

import collections
import re
import shutil
from pathlib import Path

import torch
import torch.fx as fx
from tabulate import tabulate
from torch.fx.passes.shape_prop import ShapeProp

from atom_compile.capture import example_inputs
from atom_compile.kv_cache import allocate_layer_cache

aten = torch.ops.aten
atom = torch.ops.atom

DUMP_FILE = re.compile(r"^(layer_\d+/)?\d\d_[a-z0-9_]+\.py$")
DUMP_DIR = re.compile(r"^layer_\d+$")


class Instrument:
    """Hooks around the passes of one layer's pipeline; the default hooks do nothing."""

    def before_pipeline(self, gm: fx.GraphModule, ctx) -> None:
        pass

    def after_pass(self, index: int, p, gm: fx.GraphModule, modified: bool, nodes_before, seconds, ctx) -> None:
        pass

    def after_lowering(self, gm: fx.GraphModule, seconds: float, ctx) -> None:
        pass


def propagate_shapes(gm: fx.GraphModule, arch, batch: int = 1, seq: int = 4) -> None:
    """Fill node.meta["tensor_meta"] by running the graph on small random inputs (CPU-cheap)."""
    param = next(iter(gm.buffers()))
    dtype = next((b.dtype for b in gm.buffers() if b.is_floating_point()), torch.float32)
    hidden, cos, sin, seqlens = example_inputs(arch, batch, seq, dtype=dtype, device=param.device)
    caches = allocate_layer_cache(gm.meta["atom.kv_cache_spec"], batch, arch.num_kv_heads, seq, dtype, param.device)
    with torch.no_grad():
        ShapeProp(gm).propagate(hidden, cos, sin, seqlens, *caches)


class CaptureValues(fx.Interpreter):
    """Runs a graph and keeps a detached copy of every call's output by node name (``values``): for comparing two
    lowerings of one graph node by node (tests/kernels/test_lowering_triton.py, bench/diag_gpu.py)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, object] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.op == "call_function":
            copy = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
            self.values[n.name] = tuple(copy(o) for o in out) if isinstance(out, (tuple, list)) else copy(out)
        return out


def op_name(node: fx.Node) -> str:
    if node.op != "call_function":
        return node.op
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._schema.name.split('::')[-1]}"
    return getattr(t, "__name__", str(t))


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        head = ", ".join(str(v) for v in value.flatten()[:6].tolist())
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)} [{head}{', ...' if value.numel() > 6 else ''}]"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def meta_table(gm: fx.GraphModule) -> str:
    rows = []
    for n in gm.graph.nodes:
        tm = n.meta.get("tensor_meta")
        if tm is not None:
            metas = [tm] if hasattr(tm, "shape") else list(tm)
            shape = "; ".join(f"{str(m.dtype).removeprefix('torch.')}{list(m.shape)}" for m in metas
                              if hasattr(m, "shape"))
            rows.append((n.name, "shape", shape))
        for key, value in n.meta.items():
            if key.startswith("atom."):
                rows.append((n.name, key, _describe(value)))
    return tabulate(rows, headers=["node", "meta", "value"], tablefmt="simple") if rows else "(no meta)"


def node_census(nodes) -> collections.Counter:
    return collections.Counter(op_name(n) for n in nodes if n.op == "call_function")


def census_diff(b: collections.Counter, a: collections.Counter) -> str:
    parts = [f"+{a[k] - b[k]} {k}" for k in sorted(a) if a[k] > b[k]]
    parts += [f"-{b[k] - a[k]} {k}" for k in sorted(b) if b[k] > a[k]]
    return ", ".join(parts) or "none"


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class DumpGraphs(Instrument):
    """Write ``layer_NN/00_input.py``, ``01_outlier_analysis.py``, ..., ``NN_lowered.py`` per dumped layer.

    Each file: a header (pass, modified, node changes, seconds), the readable graph (weights elided:
    attributes appear by name), and a table of each node's shape and ``atom.*`` meta. The lowered file
    adds the kernel table. An existing ``dump_dir`` is wiped only if everything in it looks like a dump.
    """

    def __init__(self, dump_dir: str | Path, layers: set[int] | None = None):
        self.root = Path(dump_dir)
        self.layers = layers
        self._prepare_root()
        self._last_index = 0

    def _prepare_root(self) -> None:
        if self.root.exists():
            if not self.root.is_dir():
                raise ValueError(f"dump_dir {self.root} exists and is not a directory")
            foreign = [
                str(p.relative_to(self.root)) for p in self.root.rglob("*")
                if not (DUMP_FILE.match(str(p.relative_to(self.root)).replace("\\", "/"))
                        or (p.is_dir() and DUMP_DIR.match(p.name)))
            ]
            if foreign:
                raise ValueError(
                    f"refusing to wipe dump_dir {self.root}: it holds files atom-compile did not write "
                    f"({', '.join(sorted(foreign)[:5])}); choose an empty or dedicated directory"
                )
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)

    def _wanted(self, gm) -> bool:
        return self.layers is None or gm.meta.get("atom.layer_index") in self.layers

    def _write(self, gm, filename: str, header: list[str], extra: str = "") -> None:
        folder = self.root / f"layer_{gm.meta.get('atom.layer_index', 0):02d}"
        folder.mkdir(exist_ok=True)
        code = gm.print_readable(print_output=False, include_stride=False, include_device=False)
        body = "\n".join(f"# {h}" for h in header) + "\n\n" + code + "\n"
        body += '\n"""\nNode meta\n\n' + meta_table(gm) + "\n" + extra + '"""\n'
        (folder / filename).write_text(body)

    def before_pipeline(self, gm, ctx) -> None:
        if self._wanted(gm):
            propagate_shapes(gm, ctx.arch)
            self._write(gm, "00_input.py", ["pass: (captured graph)", f"config: {ctx.config.name}"])

    def after_pass(self, index, p, gm, modified, nodes_before, seconds, ctx) -> None:
        self._last_index = index
        if not self._wanted(gm):
            return
        propagate_shapes(gm, ctx.arch)
        header = [
            f"pass: {p.name}",
            f"modified: {modified}",
            f"nodes: {nodes_before[0]} -> {len(gm.graph.nodes)} "
            f"({census_diff(nodes_before[1], node_census(gm.graph.nodes))})",
            f"seconds: {seconds:.3f}",
            f"requires: {sorted(p.requires)}  provides: {sorted(p.provides)}",
        ]
        self._write(gm, f"{index:02d}_{_snake(p.name)}.py", header)

    def after_lowering(self, gm, seconds, ctx) -> None:
        if not self._wanted(gm):
            return
        table = gm.meta.get("atom.kernel_table", [])
        extra = "\nKernel table\n\n" + tabulate(
            table, headers=["node", "op", "implementation", "launch config"], tablefmt="simple"
        ) + "\n"
        header = [f"stage: lowering ({gm.meta.get('atom.backend')})", f"seconds: {seconds:.3f}"]
        self._write(gm, f"{self._last_index + 1:02d}_lowered.py", header, extra)


class GraphVerificationError(AssertionError):
    """A graph broke an invariant between passes."""


class VerifyGraph(Instrument):
    """Check invariants after every pass (TVM's WellFormed): lint, shapes, permutations, fusion, KV dtypes."""

    def __init__(self):
        self.facts: set[str] = set()

    def before_pipeline(self, gm, ctx) -> None:
        self.facts = set()
        self.verify(gm, ctx, "captured graph")

    def after_pass(self, index, p, gm, modified, nodes_before, seconds, ctx) -> None:
        self.facts |= set(p.provides)
        self.verify(gm, ctx, f"after {p.name}")

    def verify(self, gm: fx.GraphModule, ctx, where: str) -> None:
        def fail(msg):
            raise GraphVerificationError(f"{where}: {msg}")

        try:
            gm.graph.lint()
        except Exception as e:  # lint raises RuntimeError on a malformed graph
            fail(f"graph.lint() failed: {e}")
        propagate_shapes(gm, ctx.arch)
        for n in gm.graph.nodes:
            if n.op in ("placeholder", "call_function", "get_attr") and "tensor_meta" not in n.meta:
                fail(f"node {n.name} has no shape/dtype meta")
        for n in gm.graph.nodes:
            want = n.meta.get("atom.input_perm")
            if want is not None:
                have = producer_perm(n.args[0])
                if have is None or not torch.equal(have.cpu(), want.cpu()):
                    fail(f"{n.name} expects its input reordered, but its producer {n.args[0].name} "
                         "does not emit that order")
            if n.target in (atom.rms_norm.default, atom.rms_norm_quant.default) and n.args[3] is not None:
                if not torch.equal(getattr(gm, n.args[3].target).cpu(), n.meta["atom.perm"].cpu()):
                    fail(f"{n.name}: its perm input differs from the order recorded in meta")
        if "fused_gemm" in self.facts:
            stray = [n.name for n in gm.graph.nodes
                     if n.target in (atom.dequantize_act.default, atom.dequantize_weight.default)]
            if stray:
                fail(f"dequantize nodes left after FuseDequantIntoGemm: {stray}")
        self._check_kv(gm, fail)

    @staticmethod
    def _check_kv(gm, fail) -> None:
        spec = gm.meta["atom.kv_cache_spec"]
        placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
        for name, dtype, last in spec:
            node = placeholders.get(name)
            if node is None:
                fail(f"KV cache input {name} declared in the spec is not a graph input")
            tm = node.meta["tensor_meta"]
            if dtype != "model" and tm.dtype != getattr(torch, dtype):
                fail(f"KV cache input {name} is {tm.dtype}, the spec says {dtype}")
            if tm.shape[-1] != last:
                fail(f"KV cache input {name} has last dim {tm.shape[-1]}, the spec says {last}")
        stores = [n for n in gm.graph.nodes if n.target in (atom.kv_cache_store.default, atom.kv_cache_store_quant.default)]
        attns = [n for n in gm.graph.nodes if n.target in (atom.attention.default, atom.attention_quant_kv.default)]
        quantized = len(spec) == 4
        for n in stores + attns:
            is_q = n.target in (atom.kv_cache_store_quant.default, atom.attention_quant_kv.default)
            if is_q != quantized:
                fail(f"{n.name} ({op_name(n)}) does not match the {'quantized' if quantized else 'float'} cache")
        if quantized and stores and attns and stores[0].args[7] != attns[0].args[6]:
            fail(f"KV written at {stores[0].args[7]} bits but read at {attns[0].args[6]} bits")


def producer_perm(node: fx.Node):
    """The channel order a node's value is in, walking back through quantize/dequantize/getitem."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 8:
        if "atom.perm" in node.meta:
            return node.meta["atom.perm"]
        if node.target in (atom.dequantize_act.default,) or getattr(node.target, "__name__", "") == "getitem":
            node = node.args[0]
        elif node.target == atom.quantize_act.default:
            node = node.args[0]
        else:
            return None
        seen += 1
    return None
