"""OutlierAnalysis: score every input channel of every linear on calibration data; outliers go last.

Requires: -
Provides: {"outlier_order"}

The graph is not rewritten; the result is an order per linear *input* (linears that share an input,
q/k/v and gate/up, share one order), recorded in meta::

    Before: %n = atom.rms_norm(%x, %w, eps, None);  %q = aten.linear(%n, %Wq)  ...
    After:  the same graph, with
            %n.meta["atom.channel_order"] = perm   # argsort(score) ascending: the n outliers are last
            %n.meta["atom.n_outliers"]    = n      # after the size-adaptation rule of AtomConfig
            gm.meta["atom.outlier_order"] = {"input_layernorm": perm, "attention": ..., ...}

Scores are taken in the input's original channel order: ``hessian`` = sum of x^2 over all calibration
tokens (the diagonal of X^T X), ``abs_mean`` = mean |x|.
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
    provides = frozenset({"outlier_order"})

    def call(self, gm: fx.GraphModule) -> PassResult:
        cfg = self.ctx.config
        orders: dict[str, torch.Tensor] = {}
        gm.meta["atom.outlier_order"] = orders
        if not cfg.quantizes_weights or cfg.n_outliers == 0:
            return PassResult(gm, False)
        if self.ctx.calibration is None:
            raise ValueError(
                f"OutlierAnalysis needs calibration data to find the {cfg.n_outliers} outlier channels; "
                "pass calib_data to atom_compile.compile"
            )
        groups = linear_inputs(gm)
        K = {name: get_attr_tensor(gm, lins[0].args[1]).shape[1] for name, lins in groups.items()}
        scores = {name: torch.zeros(k, dtype=torch.float64) for name, k in K.items()}
        metric = cfg.outlier_metric

        def accumulate(name: str, x: torch.Tensor) -> None:
            xf = x.detach().reshape(-1, x.shape[-1]).double()
            scores[name] += (xf * xf).sum(0).cpu() if metric == "hessian" else xf.abs().sum(0).cpu()

        self.ctx.calibration.run(gm, watch=scores.keys(), on_value=accumulate)
        nodes = {n.name: n for n in gm.graph.nodes}
        for name, score in scores.items():
            if metric == "abs_mean":
                score = score / self.ctx.calibration.num_tokens
            n_out = cfg.resolve(K[name]).n_outliers
            perm = torch.argsort(score, stable=True)
            orders[name] = perm
            node = nodes[name]
            node.meta["atom.channel_order"] = perm
            node.meta["atom.channel_scores"] = score.float()
            node.meta["atom.n_outliers"] = n_out
        return PassResult(gm, False)
