"""Perplexity on real text: non-overlapping windows, next-token NLL averaged over every predicted token."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    logits_fn: Callable[[Tensor], Tensor],
    windows: Tensor,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "perplexity",
) -> dict:
    """exp(mean NLL) of ``windows`` [N, L]: each window predicts its tokens 1..L-1 from the ones before.

    ``logits_fn(ids [b, L]) -> logits [b, L, vocab]``; a compiled model or ``lambda x: hf(x).logits``.
    """
    start = time.perf_counter()
    nll = 0.0
    count = 0
    for i in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        ids = windows[i : i + batch_size].to(device)
        logits = logits_fn(ids)[:, :-1].float()
        target = ids[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        nll += float(loss.double())
        count += target.numel()
    return {
        "ppl": math.exp(nll / count),
        "nll": nll / count,
        "tokens": count,
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "seconds": time.perf_counter() - start,
    }


@torch.no_grad()
def evaluate_against_reference(
    models: dict[str, Callable[[Tensor], Tensor]],
    reference: Callable[[Tensor], Tensor],
    windows: Tensor,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, dict]:
    """Perplexity, KL(reference || model) and top-1 agreement of each model, in one pass over ``windows``.

    KL is the mean over predicted tokens of sum_v p_ref(v) (log p_ref(v) - log p_model(v)), in nats; top-1
    agreement is the fraction of positions where both models' most likely next token is the same. Both are
    sharper than perplexity on a small model. The reference's own row has KL 0 and agreement 1.
    """
    start = time.perf_counter()
    acc = {name: {"nll": 0.0, "kl": 0.0, "agree": 0, "seconds": 0.0} for name in ["reference", *models]}
    count = 0
    for i in tqdm(range(0, windows.shape[0], batch_size), desc="evaluate", disable=not progress, leave=False):
        ids = windows[i : i + batch_size].to(device)
        target = ids[:, 1:].reshape(-1)
        t0 = time.perf_counter()
        ref_logp = torch.log_softmax(reference(ids)[:, :-1].float(), -1)
        acc["reference"]["seconds"] += time.perf_counter() - t0
        ref_logp = ref_logp.reshape(target.numel(), -1)
        ref_top = ref_logp.argmax(-1)
        acc["reference"]["nll"] -= float(ref_logp.gather(1, target[:, None]).double().sum())
        acc["reference"]["agree"] += target.numel()
        ref_p = ref_logp.exp()
        for name, fn in models.items():
            t0 = time.perf_counter()
            logp = torch.log_softmax(fn(ids)[:, :-1].float(), -1).reshape(target.numel(), -1)
            acc[name]["seconds"] += time.perf_counter() - t0
            acc[name]["nll"] -= float(logp.gather(1, target[:, None]).double().sum())
            acc[name]["kl"] += float((ref_p * (ref_logp - logp)).sum(-1).double().sum())
            acc[name]["agree"] += int((logp.argmax(-1) == ref_top).sum())
        count += target.numel()
    out = {}
    for name, a in acc.items():
        out[name] = {"ppl": math.exp(a["nll"] / count), "kl": a["kl"] / count, "top1_agreement": a["agree"] / count,
                     "tokens": count, "seconds": a["seconds"]}
    out["reference"]["total_seconds"] = time.perf_counter() - start
    return out
