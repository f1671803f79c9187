"""OutlierAnalysis: score every input channel of every linear on calibration data; outliers go last.

Requires: -
Provides: {"outlier_order", "input_hessians"}

The graph is not rewritten; the result is an order per linear *input* (linears that share an input,
q/k/v and gate/up, share one order), recorded in meta::

    Before: %n = atom.rms_norm(%x, %w, eps, None);  %q = aten.linear(%n, %Wq)  ...
    After:  the same graph, with
            %n.meta["atom.channel_order"] = perm   # argsort(score) ascending: the n outliers are last
            %n.meta["atom.n_outliers"]    = n      # after the size-adaptation rule of AtomConfig
            gm.meta["atom.outlier_order"] = {"input_layernorm": perm, "attention": ..., ...}
            gm.meta["atom.input_hessians"] = {"input_layernorm": X^T X, ...}     # GPTQ only

Scores are taken in the input's original channel order: ``hessian`` = sum of x^2 over all calibration
tokens (the diagonal of X^T X), ``abs_mean`` = mean |x|. When the weights use GPTQ, the same forward
pass accumulates the whole X^T X of each input for it: the layer's float activations on inputs that
the already-quantized earlier layers produced (GPTQ's layer-by-layer mode).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .base import AtomPass, PassResult, get_attr_tensor, linear_nodes


def linear_inputs(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Input node name -> the linears that consume it, in graph order."""
    groups: dict[str, list[fx.Node]] = {}
    for lin in linear_nodes(gm):
        groups.setdefault(lin.args[0].name, []).append(lin)
    return groups


class OutlierAnalysis(AtomPass):
    provides = frozenset({"outlier_order", "input_hessians"})

    def call(self, gm: fx.GraphModule) -> PassResult:
        cfg = self.ctx.config
        orders: dict[str, torch.Tensor] = {}
        hessians: dict[str, torch.Tensor] = {}
        gm.meta["atom.outlier_order"] = orders
        gm.meta["atom.input_hessians"] = hessians
        want_order = cfg.quantizes_weights and cfg.n_outliers > 0
        want_hessian = cfg.quantizes_weights and cfg.weight_method == "gptq"
        if not (want_order or want_hessian):
            return PassResult(gm, False)
        if self.ctx.calibration is None:
            raise ValueError(
                f"{cfg.name}: outlier analysis and GPTQ need calibration data; pass calib_data to atom_compile.compile"
            )
        groups = linear_inputs(gm)
        K = {name: get_attr_tensor(gm, lins[0].args[1]).shape[1] for name, lins in groups.items()}
        sq = {name: torch.zeros(k, dtype=torch.float64) for name, k in K.items()}
        absum = {name: torch.zeros(k, dtype=torch.float64) for name, k in K.items()}
        if want_hessian:
            hessians.update({name: torch.zeros(k, k, dtype=torch.float64) for name, k in K.items()})

        def accumulate(name: str, x: torch.Tensor) -> None:
            xf = x.detach().reshape(-1, x.shape[-1]).float()
            sq[name] += (xf * xf).sum(0).double().cpu()
            absum[name] += xf.abs().sum(0).double().cpu()
            if want_hessian:
                hessians[name] += (xf.t() @ xf).double().cpu()

        self.ctx.calibration.run(gm, watch=K.keys(), on_value=accumulate)
        nodes = {n.name: n for n in gm.graph.nodes}
        for name in K:
            for lin in groups[name]:
                lin.meta["atom.input_stats"] = name
            if not want_order:
                continue
            score = sq[name] if cfg.outlier_metric == "hessian" else absum[name] / self.ctx.calibration.num_tokens
            perm = torch.argsort(score, stable=True)
            orders[name] = perm
            node = nodes[name]
            node.meta["atom.channel_order"] = perm
            node.meta["atom.channel_scores"] = score.float()
            node.meta["atom.n_outliers"] = cfg.resolve(K[name]).n_outliers
        return PassResult(gm, False)
