"""InsertQuantNodes: quantize every linear's weights (RTN or GPTQ) and insert dynamic activation quantization.

Requires: {"reordered", "input_hessians"}
Provides: {"quantized"}

The result computes exactly the fake-quant reference: quantize, dequantize, float GEMM. One
``quantize_act`` per linear input is shared by the linears that read it (q/k/v, gate/up)::

    Before: %q = aten.linear(%n, %Wq)
    After:  %xq = atom.quantize_act(%n, "int4", 128, 64, "int8", 0.9)      # (codes, scales, outliers, o_scales)
            %xd = atom.dequantize_act(%xq[0], %xq[1], %xq[2], %xq[3], "int4", 128, "int8", float32)
            %wd = atom.dequantize_weight(%q_proj_wq, %q_proj_ws, %q_proj_wo, %q_proj_wos, "int4", 128, "int8", 1, float32)
            %q  = aten.linear(%xd, %wd)

Weights are stored quantized (packed 4-bit codes, group scales, INT8 outlier columns and their
per-row scales) and the float weight is dropped. With ``weight_method="gptq"`` the linears are
quantized from the Hessian X^T X of their input that OutlierAnalysis collected: the layer's float
activations on inputs produced by the already-quantized earlier layers.
With fp activations (W4A16) only the weight side is inserted.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from atom_compile import quant
from atom_compile.config import ConfigError
from atom_compile.gptq import gptq_quantize

from .base import AtomPass, PassResult, add_attr, atom, delete_attr_if_unused, get_attr_tensor
from .outlier_analysis import linear_inputs


def insert_multi_output(graph: fx.Graph, target, args, name: str) -> tuple[fx.Node, list[fx.Node]]:
    """A call to an op returning a 4-tensor qtensor, plus the getitem nodes that unpack it."""
    node = graph.call_function(target, args)
    node._rename(name)
    items = []
    anchor = node
    for i, part in enumerate(QTENSOR_PARTS):
        with graph.inserting_after(anchor):
            anchor = graph.call_function(operator.getitem, (node, i))
        anchor._rename(f"{name}_{part}")
        items.append(anchor)
    return node, items


QTENSOR_PARTS = ("codes", "scales", "outliers", "outlier_scales")


class InsertQuantNodes(AtomPass):
    requires = frozenset({"reordered", "input_hessians"})
    provides = frozenset({"quantized"})

    def call(self, gm: fx.GraphModule) -> PassResult:
        cfg = self.ctx.config
        if not cfg.quantizes_weights:
            return PassResult(gm, False)
        for input_name, linears in linear_inputs(gm).items():
            x = linears[0].args[0]
            K = get_attr_tensor(gm, linears[0].args[1]).shape[1]
            spec = cfg.resolve(K)
            H = self._hessian(gm, linears[0]) if spec.weight_method == "gptq" else None
            dtype = get_attr_tensor(gm, linears[0].args[1]).dtype
            x_in = x
            if cfg.quantizes_activations:
                with gm.graph.inserting_before(linears[0]):
                    xq, items = insert_multi_output(
                        gm.graph, atom.quantize_act.default,
                        (x, spec.act_format, spec.group_size, spec.n_outliers, spec.outlier_format, spec.act_clip),
                        f"{input_name}_quant",
                    )
                with gm.graph.inserting_after(items[-1]):
                    x_in = gm.graph.call_function(
                        atom.dequantize_act.default,
                        (*items, spec.act_format, spec.group_size, spec.outlier_format, dtype),
                    )
                x_in._rename(f"{input_name}_dequant")
                xq.meta["atom.qparams"] = _spec_meta(spec, "activation")
            weights = self._quantize_weights(gm, linears, spec, H)
            for lin, qt in zip(linears, weights):
                self._insert_weight(gm, lin, x_in, spec, qt)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def _hessian(self, gm: fx.GraphModule, linear: fx.Node) -> torch.Tensor:
        """X^T X of a linear's input, recorded by OutlierAnalysis and reordered by ReorderChannels."""
        key = linear.meta.get("atom.input_stats")
        hessians = gm.meta.get("atom.input_hessians", {})
        if key not in hessians:
            raise ValueError(
                f"GPTQ for {linear.name} needs the input Hessian that OutlierAnalysis records from "
                "calibration data; pass calib_data to atom_compile.compile"
            )
        return hessians[key]

    def _quantize_weights(self, gm, linears, spec, H) -> list[tuple]:
        """The qtensors of linears sharing one input. GPTQ runs once on their stacked rows (rows are
        independent given the shared Hessian); RTN quantizes each row on its own."""
        Ws = [get_attr_tensor(gm, lin.args[1]) for lin in linears]
        for lin, W in zip(linears, Ws):
            if W.shape[0] % spec.weight_channel_group:
                raise ConfigError(
                    f"weight_channel_group {spec.weight_channel_group} does not divide the {W.shape[0]} rows of "
                    f"{lin.name}; use a divisor of every linear's output size (1, 2, 4, ...)"
                )
        if H is None:
            return [quant.quantize_rows(W, spec.weight_format, spec.group_size, spec.n_outliers, spec.outlier_format,
                                        spec.weight_clip, spec.weight_channel_group, spec.weight_clip_search)
                    for W in Ws]
        stacked = gptq_quantize(torch.cat([W.float() for W in Ws]), H, spec, self.ctx.config.gptq_percdamp)
        out, start = [], 0
        for W in Ws:
            n = W.shape[0]
            rows = slice(start, start + n)
            srows = slice(start // spec.weight_channel_group, (start + n) // spec.weight_channel_group)
            out.append((stacked[0][rows], stacked[1][srows], stacked[2][rows], stacked[3][srows]))
            start += n
        return out

    def _insert_weight(self, gm, lin: fx.Node, x_in: fx.Node, spec, qt) -> None:
        w_node = lin.args[1]
        W = get_attr_tensor(gm, w_node)
        q, scales, outliers, outlier_scales = qt
        if spec.outlier_format == "fp16":
            outliers = outliers.to(W.dtype)
        attrs = [
            add_attr(gm, lin, f"{lin.name}_{suffix}", t.contiguous().to(W.device))
            for suffix, t in (("wq", q), ("ws", scales), ("wo", outliers), ("wos", outlier_scales))
        ]
        with gm.graph.inserting_before(lin):
            w_deq = gm.graph.call_function(
                atom.dequantize_weight.default,
                (*attrs, spec.weight_format, spec.group_size, spec.outlier_format,
                 spec.weight_channel_group, W.dtype),
            )
        w_deq._rename(f"{lin.name}_weight_dequant")
        lin.args = (x_in, w_deq, *lin.args[2:])
        lin.meta["atom.qparams"] = _spec_meta(spec, "weight")
        if not w_node.users:
            gm.graph.erase_node(w_node)
        delete_attr_if_unused(gm, w_node.target)


def _spec_meta(spec, side: str) -> dict:
    meta = {
        "format": spec.weight_format if side == "weight" else spec.act_format,
        "group_size": spec.group_size,
        "n_outliers": spec.n_outliers,
        "outlier_format": spec.outlier_format,
        "clip": spec.weight_clip if side == "weight" else spec.act_clip,
    }
    if side == "weight":
        meta["method"] = spec.weight_method
        meta["clip_search"] = spec.weight_clip_search
        meta["channel_group"] = spec.weight_channel_group
    return meta
