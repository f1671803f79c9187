"""The Triton Hadamard rotation (runtime_kernels/hadamard.py) against ops.hadamard_heads_reference.

Stated bound: fp32 outputs within 2^-20 of the reference relative to each row's largest value (the sums
run in another order, and for head_dim 128 the 1/sqrt(D) scale is applied once more); bf16 / fp16
outputs at most one unit in the last place from the reference's, and fewer than 2% of them differ.
"""

import pytest
import torch

from atom_compile.ops import hadamard_heads_reference
from atom_compile.runtime_kernels.hadamard import hadamard_heads

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,heads", [(64, 3), (128, 2)])
def test_matches_reference(device, dtype, D, heads):
    g = torch.Generator().manual_seed(D + heads)
    x = (torch.randn(2, 37, heads * D, generator=g) * 3).to(dtype)
    ref = hadamard_heads_reference(x, D)  # on the CPU: the definition
    y = hadamard_heads(x.to(device), D).cpu()
    assert y.shape == x.shape and y.dtype == dtype
    yf, rf = y.float(), ref.float()
    if dtype == torch.float32:
        row_max = rf.unflatten(-1, (heads, D)).abs().amax(-1, keepdim=True)
        err = ((yf - rf).unflatten(-1, (heads, D)).abs() / row_max).max()
        assert float(err) <= 2.0**-20, float(err)
    else:
        diff = (yf - rf).abs()
        assert bool((diff <= rf.abs() * ULP[dtype] + 1e-6).all())
        assert float((diff > 0).float().mean()) < 0.02


def test_rotation_is_its_own_inverse(device):
    x = torch.randn(5, 4 * 64, generator=torch.Generator().manual_seed(1)).to(device)
    back = hadamard_heads(hadamard_heads(x, 64), 64)
    assert torch.allclose(back, x, rtol=0, atol=1e-5)
