"""OutlierAnalysis: score every input channel of every linear on calibration data; outliers go last.

Requires: -
Provides: {"outlier_order", "input_hessians"}

The graph is not rewritten; the result is an order per linear *input* (linears that share an input,
q/k/v and gate/up, share one order), recorded in meta::

    Before: %n = atom.rms_norm(%x, %w, eps, None);  %q = aten.linear(%n, %Wq)  ...
    After:  the same graph, with
            %n.meta["atom.channel_order"] = perm   # the n outliers last (argsort(score)'s last n), the normal
                                                   # channels in groups of score-sorted runs of 16 (see below)
            %n.meta["atom.n_outliers"]    = n      # after the size-adaptation rule of AtomConfig
            gm.meta["atom.outlier_order"] = {"input_layernorm": perm, "attention": ..., ...}
            gm.meta["atom.input_hessians"] = {"input_layernorm": X^T X, ...}     # GPTQ only

Which normal channels share a group is AtomConfig.channel_order's choice; the outliers are the same in all:
- ``"chunks"`` (the default): groups made of aligned runs of 16 consecutive input channels, the runs sorted by
  their best channel's score, the outliers inside kept runs swapped for the normal channels of the runs left over
  (``chunk_channel_order``; the score order where 16 does not divide the group size and the channel count);
- ``"score"``: every normal channel sorted by score (argsort(score), Atom's reorder);
- ``"blocks"``: each normal group one block of g consecutive input channels (the K_n / g blocks with the fewest
  outliers), with the same swaps (``block_channel_order``).
For runs and blocks the GPU quantizer loads each group as runs of 16-byte loads and fixes up the few swapped
channels, instead of gathering every channel of the row (runtime_kernels/quantize.py). On SmolLM2 the chunk order's
perplexity equals the score order's within the measurement's noise (docs/accuracy.md).

Scores are taken in the input's original channel order: ``hessian`` = sum of x^2 over all calibration
tokens (the diagonal of X^T X), ``abs_mean`` = mean |x|. When the weights use GPTQ, the same forward
pass accumulates the whole X^T X of each input for it: the layer's float activations on inputs that
the already-quantized earlier layers produced (GPTQ's layer-by-layer mode).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .base import AtomPass, PassResult, get_attr_tensor, linear_nodes


def _outliers(score_order: torch.Tensor, n_outliers: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The outliers (score_order's last n, in that order) and a mask of them over the channels; checks that the
    normal channels fill whole groups."""
    K = score_order.numel()
    if (K - n_outliers) % group_size:
        raise ValueError(f"{K} channels - {n_outliers} outliers are not groups of {group_size}")
    outliers = score_order[K - n_outliers:]
    is_outlier = torch.zeros(K, dtype=torch.bool)
    is_outlier[outliers] = True
    return outliers, is_outlier


def block_channel_order(score_order: torch.Tensor, n_outliers: int, group_size: int) -> torch.Tensor:
    """A channel order with the same outliers last (the last ``n_outliers`` of ``score_order``, in that order)
    whose normal groups are blocks of ``group_size`` consecutive channels.

    The (K - n) / g full blocks with the fewest outliers (ties: the lower block) become the groups, in channel
    order; inside them each outlier channel is replaced, in ascending order, by the next normal channel that lies
    outside every chosen block. Example, K = 8, g = 2, outliers {1, 6}: 3 groups; blocks 1 and 2 hold no outlier,
    blocks 0 and 3 one each, so the groups are blocks 0, 1, 2 and channel 7 takes outlier 1's place:
    [0, 7, 2, 3, 4, 5 | 1, 6].
    """
    K = score_order.numel()
    outliers, is_outlier = _outliers(score_order, n_outliers, group_size)
    n_groups = (K - n_outliers) // group_size
    n_blocks = K // group_size
    counts = is_outlier[: n_blocks * group_size].view(n_blocks, group_size).sum(1)
    chosen = sorted(sorted(range(n_blocks), key=lambda b: (int(counts[b]), b))[:n_groups])
    in_group = torch.zeros(K, dtype=torch.bool)
    for b in chosen:
        in_group[b * group_size:(b + 1) * group_size] = True
    fill = iter(torch.nonzero(~in_group & ~is_outlier).flatten().tolist())
    normal = []
    for b in chosen:
        for c in range(b * group_size, (b + 1) * group_size):
            normal.append(next(fill) if is_outlier[c] else c)
    return torch.cat([torch.tensor(normal, dtype=score_order.dtype), outliers])


CHUNK_RUN = 16  # channels per run of chunk_channel_order (bf16: one 32-byte sector)


def chunk_order_fits(K: int, group_size: int) -> bool:
    """Whether ``chunk_channel_order`` applies (runs of CHUNK_RUN dividing the group and the channel count);
    otherwise channel_order="chunks" keeps the score order."""
    return group_size % CHUNK_RUN == 0 and K % CHUNK_RUN == 0


def chunk_channel_order(score_order: torch.Tensor, n_outliers: int, group_size: int,
                        unit: int = CHUNK_RUN) -> torch.Tensor:
    """A channel order with the same outliers last whose normal groups are made of aligned runs of ``unit``
    consecutive channels sorted by score: between Atom's score order (every channel sorted) and
    ``block_channel_order`` (each group one block of consecutive channels).

    The (K - n) / unit runs with the fewest outliers (ties: the lower run) are kept; each is ranked by its
    highest-scoring normal channel (its rank in ``score_order``), and groups take g / unit runs each in that rank
    order, so a group's runs have similar maxima, as the score order's groups do. Each outlier inside a kept run is
    replaced by a normal channel of the runs left over, the lowest-ranked filler to the lowest-ranked group.

    Where a group's channels sit inside it changes nothing in the maths (one scale per group), only how the GPU
    quantizer loads them (runtime_kernels/quantize.py: ``plan_blocks``). With a multiple of 4 runs per group, each
    half group takes half of the group's runs, in pairs (a, b) placed as [a's first unit / 2 | b's first unit / 2 |
    a's last unit / 2 | b's last unit / 2]: a thread of the quantizer holds 8 or 16 consecutive positions and loads 8
    at a time, so neighbouring threads read the two halves of one 32-byte run (unit 16, bf16) in the same load
    instruction (H100, 16k x 4096: 72.2-72.6 us against 75.2-75.7 us with each run split over the two half groups;
    ``bench/adhoc/quantize_chunk_placement.py``). Otherwise run r's first unit / 2 channels take positions r * unit / 2
    of the group's first half and its last unit / 2 the same positions of the second half.

    Example, K = 12, g = 4, unit = 2, score order [8, 9, 2, 3, 0, 10, 5, 4 | 11, 7, 1, 6] (outliers last): the runs
    {2,3} {4,5} {8,9} hold no outlier, then {0,1} (one; the lower of the two with one) is kept, {6,7} and {10,11}
    are left over; ranked by their best normal channel ({8,9}: 1, {2,3}: 3, {0,1}: 4, {4,5}: 7), with channel 10 in
    outlier 1's place and (2 runs per group) each run split over the two halves of its group the order is [8, 2, 9,
    3, 0, 4, 10, 5 | 11, 7, 1, 6]. With g = 8 (4 runs per group: {8,9} {2,3} {0,1} {4,5}, channel 10 for 1) the pairs
    place it as [8, 2, 9, 3, 0, 4, 10, 5 | 11, 7, 1, 6] too (unit / 2 = 1: a's first, b's first, a's last, b's last).
    """
    K = score_order.numel()
    if unit % 2 or group_size % unit or K % unit:
        raise ValueError(f"the run of {unit} must be even and divide the group size {group_size} and the {K} channels")
    outliers, is_outlier = _outliers(score_order, n_outliers, group_size)
    n_keep = (K - n_outliers) // unit
    rank = torch.empty(K, dtype=torch.long)
    rank[score_order] = torch.arange(K)
    n_runs = K // unit
    counts = is_outlier.view(n_runs, unit).sum(1).tolist()
    kept = sorted(range(n_runs), key=lambda r: (counts[r], r))[:n_keep]
    normal_rank = torch.where(is_outlier, torch.full_like(rank, -1), rank).view(n_runs, unit).amax(1).tolist()
    kept.sort(key=lambda r: (normal_rank[r], r))
    in_kept = torch.zeros(n_runs, dtype=torch.bool)
    in_kept[kept] = True
    leftover = (~in_kept).repeat_interleave(unit) & ~is_outlier
    fill = iter(sorted(torch.nonzero(leftover).flatten().tolist(), key=lambda c: int(rank[c])))
    normal = torch.tensor([next(fill) if is_outlier[c] else c for r in kept for c in range(r * unit, (r + 1) * unit)],
                          dtype=score_order.dtype)
    runs = group_size // unit
    if runs % 4 == 0:  # [groups, half groups, pairs, 2 runs, 2 parts, unit / 2] -> [..., 2 parts, 2 runs, unit / 2]
        normal = normal.view(-1, 2, runs // 4, 2, 2, unit // 2).transpose(3, 4).flatten()
    else:  # [groups, runs, 2 parts, unit / 2] -> [groups, 2 parts (the half groups), runs, unit / 2]
        normal = normal.view(-1, runs, 2, unit // 2).transpose(1, 2).flatten()
    return torch.cat([normal, outliers])

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
            spec = cfg.resolve(K[name])
            if cfg.channel_order == "blocks" and spec.n_outliers:
                perm = block_channel_order(perm, spec.n_outliers, spec.group_size)
            elif cfg.channel_order == "chunks" and spec.n_outliers and chunk_order_fits(K[name], spec.group_size):
                perm = chunk_channel_order(perm, spec.n_outliers, spec.group_size)
            orders[name] = perm
            node = nodes[name]
            node.meta["atom.channel_order"] = perm
            node.meta["atom.channel_scores"] = score.float()
            node.meta["atom.n_outliers"] = spec.n_outliers
        return PassResult(gm, False)
