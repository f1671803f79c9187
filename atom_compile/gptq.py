"""GPTQ (Frantar et al., 2023) as Atom applies it, in the reordered column space.

- Columns are processed left to right, act-order off (the outlier reorder replaces it).
- Normal columns are quantized group by group; a group's scales are taken when the first column
  of the group is reached, from the weights as the earlier columns' error updates left them.
- The outlier columns (the last ``n_outliers``) receive the error compensation of every normal
  column and are then quantized to INT8 per output row (or kept in float for "fp16" outliers).
- The Hessian H = X^T X comes from the layer's float activations on calibration inputs produced by
  the already-quantized earlier layers (OutlierAnalysis records it; GPTQ's nsamples is the number of
  calibration sequences).
"""

from __future__ import annotations

import torch
from torch import Tensor

from atom_compile import quant
from atom_compile.config import LinearQuantSpec


def _inverse_hessian_cholesky(H: Tensor, W: Tensor, percdamp: float) -> Tensor:
    """Upper Cholesky factor of H^-1 after damping; zeroes the weights of dead input channels."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(6):  # raise the damping tenfold until H is numerically positive definite
        L, info = torch.linalg.cholesky_ex(H + (damp * 10**attempt) * eye)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    raise ValueError("GPTQ: the Hessian is not positive definite even after damping; use more calibration data")


def gptq_quantize(W: Tensor, H: Tensor, spec: LinearQuantSpec, percdamp: float = 0.01):
    """Quantize W [N, K] (columns reordered, outliers last) with GPTQ; returns the qtensor layout.

    Rows are independent given H, so linears that share an input (q/k/v, gate/up) are quantized as one
    stacked W. The column loop runs in float32 (as GPTQ's reference code does) on a float64-inverted H.
    """
    device = W.device
    W = W.detach().float().clone()
    H = H.to(device)
    N, K = W.shape
    Kn, g, r = spec.n_normal, spec.group_size, spec.weight_channel_group
    fmt = spec.weight_format
    Hinv = _inverse_hessian_cholesky(H.double(), W, percdamp).float()
    blocksize = g * max(1, 128 // g)  # whole groups per block, so a group's scales see its updated columns
    integer = fmt.startswith("int")
    qmin, qmax = quant.int_range(fmt)

    units = torch.zeros(N, Kn, dtype=torch.int8, device=device)
    scales = torch.zeros(N // r, Kn // g, dtype=torch.float32, device=device)
    for b0 in range(0, Kn, blocksize):
        b1 = min(b0 + blocksize, Kn)
        Wb = W[:, b0:b1].clone()
        Err = torch.zeros_like(Wb)
        Hb = Hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % g == 0:
                cols = Wb[:, i : i + g]
                s = (quant.mse_group_scales(cols, fmt, g, r) if spec.weight_clip_search
                     else quant.group_scales(cols, fmt, g, spec.weight_clip, r))[:, 0]
                scales[:, col // g] = s
                s = s.repeat_interleave(r) if r > 1 else s
                s_safe = torch.where(s > 0, s, torch.ones_like(s))
            w = Wb[:, i]
            u = torch.round(w / s_safe).clamp_(qmin, qmax) if integer else quant.round_to_grid(w / s_safe, fmt)
            units[:, col] = u.to(torch.int8)
            err = (w - u * s) / Hb[i, i]
            Wb[:, i:] -= err.unsqueeze(1) * Hb[i, i:].unsqueeze(0)
            Err[:, i] = err
        W[:, b0:b1] = Wb
        W[:, b1:] -= Err @ Hinv[b0:b1, b1:]
    q = quant.encode_codes(units, fmt, g)
    outliers, outlier_scales = quant.quantize_outliers(W[:, Kn:], spec.outlier_format, r)
    return q, scales, outliers, outlier_scales
