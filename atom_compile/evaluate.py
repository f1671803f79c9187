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
