"""The Triton RoPE kernel (runtime_kernels/rope.py) against ops.rope_reference: bit-exact, in every dtype
combination the kernel takes, with cos / sin expanded over the batch as the runtime passes them."""

import pytest
import torch

from atom_compile.ops import rope_reference
from atom_compile.runtime_kernels.rope import rope


def _tables(B, T, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(T, dtype=torch.float32)[:, None] + 7 * torch.rand(1, generator=g)
    freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    ang = torch.cat([pos * freq, pos * freq], -1)
    return ang.cos().to(dtype)[None].expand(B, -1, -1), ang.sin().to(dtype)[None].expand(B, -1, -1)


@pytest.mark.parametrize("x_dtype,table_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                 (torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("B,T,H,D", [(2, 5, 3, 64), (1, 9, 4, 128)])
def test_bit_exact(device, x_dtype, table_dtype, B, T, H, D):
    g = torch.Generator().manual_seed(B * 100 + T + H + D)
    x = (torch.randn(B, T, H * D, generator=g) * 4).to(x_dtype)
    cos, sin = _tables(B, T, D, table_dtype, seed=D)
    ref = rope_reference(x, cos, sin)  # on the CPU: the definition
    y = rope(x.to(device), cos.to(device), sin.to(device)).cpu()
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert torch.equal(y, ref)
