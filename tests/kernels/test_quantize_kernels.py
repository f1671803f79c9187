"""The Triton activation quantizers against their reference ops (atom_compile/ops.py).

Runs under TRITON_INTERPRET=1 on the CPU (tests/conftest.py sets it) and natively on a CUDA device.
Inputs are fresh random rows with a few large outlier channels, never zeros. The reference always runs on
the CPU: it is the project's definition, and torch's CUDA kernels divide by a Python scalar as a multiply by
its fp32 reciprocal, so the reference run on a GPU can give scales 1 ulp off the definition.

Stated bounds (runtime_kernels/quantize.py explains them):
- gather_quant: bit-exact.
- rms_norm_quant and silu_mul_quant: every code within one of the reference's and fewer than 0.1% of
  them off; scales within a relative 2^-6 (bf16), 2^-9 (fp16), 2^-20 (fp32) of the reference's (two
  units in the last place of the rounded absmax: a normalized value one unit off, times a weight up to 2,
  can round two units away; seen with fp16 in test_row_pairs), and for bf16 / fp16 at most max(1, 0.1%)
  of the scales not bit-equal.
"""

import pytest
import torch

from atom_compile import ops, quant
from atom_compile.runtime_kernels.quantize import gather_quant, rms_norm_quant, silu_mul_quant

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (hidden, group_size, n_outliers): SmolLM2's 576 = 512 + 64, Llama's 4096 and 11008, a 1536 with 11 groups
SHAPES = [(576, 128, 64), (576, 64, 0), (1536, 128, 128), (4096, 128, 128), (11008, 64, 128)]
SCALE_RTOL = {torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9, torch.float32: 2.0**-20}


def _rows(M, K, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 1.5 + 0.1
    hot = torch.randperm(K, generator=g)[: max(4, K // 64)]
    x[:, hot] *= 20 + 30 * torch.rand(len(hot), generator=g)  # large outlier channels
    x[x == 0] = 0.5
    return x.to(dtype).to(device)


def _ref(fn, *args):
    """The reference op on CPU copies of the tensors."""
    return fn(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))


def _codes(t, g):
    return quant.unpack_nibbles(t.cpu(), g)


def _assert_same_layout(out, ref):
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == r.dtype, (o.shape, r.shape, o.dtype, r.dtype)


def _assert_exact(out, ref):
    _assert_same_layout(out, ref)
    for o, r in zip(out, ref):
        assert torch.equal(o.cpu(), r.cpu())


def _assert_bounded(out, ref, dtype, group_size):
    """The documented bound for ops whose float prologue (rstd, exp) may round differently."""
    _assert_same_layout(out, ref)
    q, s, o, os_ = (t.cpu() for t in out)
    rq, rs, ro, ros = (t.cpu() for t in ref)
    for a, b in ((_codes(q, group_size), _codes(rq, group_size)), (o.int(), ro.int())):
        if b.numel():
            diff = (a - b).abs()
            assert int(diff.max()) <= 1
            assert float((diff > 0).float().mean()) < 1e-3
    for a, b in ((s, rs), (os_, ros)):
        assert torch.all(torch.isfinite(a))
        rel = ((a - b).abs() / b.abs().clamp_min(1e-30)).max()
        assert float(rel) <= SCALE_RTOL[dtype], float(rel)
        if dtype != torch.float32:
            assert int((a != b).sum()) <= max(1, a.numel() // 1000)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,g,n_out", SHAPES)
def test_rms_norm_quant(device, dtype, K, g, n_out):
    M = 24 if K <= 1536 else 6
    x = _rows(M, K, dtype, device, seed=K + g + n_out)
    gen = torch.Generator().manual_seed(K * 3 + n_out)
    w = (torch.rand(K, generator=gen) + 0.5).to(dtype).to(device)
    perm = torch.randperm(K, generator=gen).to(device)
    args = (1e-5, perm, "int4", g, n_out, "int8", 0.9)
    out = rms_norm_quant(x, w, *args)
    ref = _ref(ops.rms_norm_quant_reference, x, w, *args)
    _assert_bounded(out, ref, dtype, g)


def test_rms_norm_quant_variants(device):
    """No perm; fp32 weight with a bf16 input (fp32 result); leading dims [B, T]; int32 perm."""
    K, g = 576, 64
    x = _rows(2 * 5, K, torch.bfloat16, device, seed=1).view(2, 5, K)
    gen = torch.Generator().manual_seed(2)
    w32 = (torch.rand(K, generator=gen) + 0.5).to(device)
    for w, perm in ((w32, None), (w32.bfloat16(), torch.randperm(K, generator=gen).int().to(device))):
        args = (1e-6, perm, "int4", g, 64, "int8", 0.85)
        out = rms_norm_quant(x, w, *args)
        ref = _ref(ops.rms_norm_quant_reference, x, w, *args)
        assert out[0].shape == (2, 5, (K - 64) // 2)
        _assert_bounded(out, ref, torch.float32 if w.dtype == torch.float32 else torch.bfloat16, g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,g,n_out", SHAPES)
def test_silu_mul_quant(device, dtype, K, g, n_out):
    M = 24 if K <= 1536 else 6
    gate = _rows(M, K, dtype, device, seed=2 * K + g) * 0.3
    up = _rows(M, K, dtype, device, seed=3 * K + n_out)
    out = silu_mul_quant(gate, up, "int4", g, n_out, "int8", 0.9)
    ref = _ref(ops.silu_mul_quant_reference, gate, up, "int4", g, n_out, "int8", 0.9)
    _assert_bounded(out, ref, dtype, g)


@pytest.mark.parametrize("chunks,gb", [(3, 2), (4, 4), (11, 1)])
def test_silu_mul_quant_rows_split_over_programs(device, chunks, gb):
    """Few rows: each row's groups split over several programs (chunks), uneven chunks and steps included;
    the same outputs as one program per row."""
    K, g, n_out = 1536, 128, 128  # 11 groups
    gate = _rows(5, K, torch.bfloat16, device, seed=41) * 0.3
    up = _rows(5, K, torch.bfloat16, device, seed=42)
    one = silu_mul_quant(gate, up, "int4", g, n_out, "int8", 0.9, chunks=1)
    split = silu_mul_quant(gate, up, "int4", g, n_out, "int8", 0.9, chunks=chunks, groups_per_step=gb)
    for a, b in zip(one, split):
        assert torch.equal(a, b)
    _assert_bounded(split, _ref(ops.silu_mul_quant_reference, gate, up, "int4", g, n_out, "int8", 0.9),
                    torch.bfloat16, g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,g,n_out", SHAPES[:4])
def test_gather_quant_bit_exact(device, dtype, K, g, n_out):
    x = _rows(16, K, dtype, device, seed=5 * K + n_out)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(K)).to(device)
    out = gather_quant(x, perm, "int4", g, n_out, "int8", 0.9)
    _assert_exact(out, _ref(ops.gather_quant_reference, x, perm, "int4", g, n_out, "int8", 0.9))


def test_gather_quant_bit_exact_many_rows(device):
    """A GPU divides with a per-group reciprocal and one FMA correction: check exactness on many values."""
    M = 4096 if device == "cuda" else 64
    K = 576
    row_scale = torch.rand(M, 1, generator=torch.Generator().manual_seed(3)) + 1e-3  # many magnitudes
    x = _rows(M, K, torch.float32, device, seed=21) * row_scale.to(device)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(4)).to(device)
    for g in (64, 128):
        out = gather_quant(x, perm, "int4", g, 64, "int8", 0.9)
        _assert_exact(out, _ref(ops.gather_quant_reference, x, perm, "int4", g, 64, "int8", 0.9))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K,g,n_out,rows", [(1536, 128, 128, 2), (576, 64, 0, 3), (576, 128, 64, 8)])
def test_row_pairs(device, dtype, K, g, n_out, rows):
    """Two rows per gather (their 16-bit patterns packed in one int32; the default from a few hundred rows on),
    forced here on an odd number of rows: rms_norm_quant within its bound, gather_quant bit-exact, both with
    packed and x16 outputs; equal to the one-row path. fp32 input cannot be paired."""
    M = 7
    x = _rows(M, K, dtype, device, seed=K + rows)
    gen = torch.Generator().manual_seed(rows)
    w = (torch.rand(K, generator=gen) + 0.5).to(dtype).to(device)
    perm = torch.randperm(K, generator=gen).to(device)
    qargs = ("int4", g, n_out, "int8", 0.9)
    ref_norm = _ref(ops.rms_norm_quant_reference, x, w, 1e-5, perm, *qargs)
    ref_gather = _ref(ops.gather_quant_reference, x, perm, *qargs)
    for x16 in (False, True):
        kw = dict(rows_per_program=rows, x16=x16)
        norm_pairs = rms_norm_quant(x, w, 1e-5, perm, *qargs, pairs=True, **kw)
        gather_pairs = gather_quant(x, perm, *qargs, pairs=True, **kw)
        for a, b in zip(norm_pairs, rms_norm_quant(x, w, 1e-5, perm, *qargs, pairs=False, **kw)):
            assert torch.equal(a, b)
        for a, b in zip(gather_pairs, gather_quant(x, perm, *qargs, pairs=False, **kw)):
            assert torch.equal(a, b)
        if not x16:
            _assert_bounded(norm_pairs, ref_norm, dtype, g)
            _assert_exact(gather_pairs, ref_gather)
    with pytest.raises(ValueError, match="16-bit"):
        gather_quant(x.float(), perm, *qargs, pairs=True)


@pytest.mark.parametrize("g", [64, 128])
def test_x16_output_is_the_unpacked_packed_output(device, g):
    """x16=True writes 16 * code in channel order (the GEMM's unpacked operand): exactly what
    unpack_activations makes of the packed output, for all three quantizers; the other outputs are equal."""
    from atom_compile.runtime_kernels.w4a4_gemm import unpack_activations

    K, n_out = 1536, 128
    x = _rows(12, K, torch.bfloat16, device, seed=31 + g)
    gen = torch.Generator().manual_seed(g)
    w = (torch.rand(K, generator=gen) + 0.5).bfloat16().to(device)
    perm = torch.randperm(K, generator=gen).to(device)
    up = _rows(12, K, torch.bfloat16, device, seed=32 + g)
    calls = [lambda **kw: rms_norm_quant(x, w, 1e-5, perm, "int4", g, n_out, "int8", 0.9, **kw),
             lambda **kw: gather_quant(x, perm, "int4", g, n_out, "int8", 0.9, **kw),
             lambda **kw: silu_mul_quant(x * 0.3, up, "int4", g, n_out, "int8", 0.9, **kw)]
    for call in calls:
        packed, unpacked = call(), call(x16=True)
        assert unpacked[0].shape == (12, K - n_out) and unpacked[0].dtype == torch.int8
        assert torch.equal(unpacked[0], unpack_activations(packed[0], g))
        assert int((unpacked[0].int() % 16).abs().sum()) == 0 and unpacked[0].int().abs().sum() > 0
        for a, b in zip(packed[1:], unpacked[1:]):
            assert torch.equal(a, b)


def test_gather_quant_zero_group_and_ties(device):
    """A zero row (scale 0, codes 0) among random rows, and exact .5 ties that must round to even."""
    K, g = 576, 64
    x = _rows(8, K, torch.float32, device, seed=9)
    x[3] = 0.0
    # row 5: absmax 7 per group with clip 1 -> scale 1, values k + 0.5 are ties
    x[5] = torch.arange(K, dtype=torch.float32, device=device) % 14 - 6.5
    x[5, ::g] = 7.0
    perm = torch.arange(K, device=device)
    out = gather_quant(x, perm, "int4", g, 64, "int8", 1.0)
    ref = _ref(ops.gather_quant_reference, x, perm, "int4", g, 64, "int8", 1.0)
    _assert_exact(out, ref)
    assert torch.all(out[0][3] == 0) and torch.all(out[1][3] == 0)


def test_unsupported_configurations_raise(device):
    x = _rows(2, 576, torch.float32, device, seed=0)
    perm = torch.arange(576, device=device)
    for args in (("int8", 64, 64, "int8"), ("fp4", 64, 64, "int8"), ("int4", 32, 64, "int8"),
                 ("int4", 128, 64, "fp16"), ("int4", 128, 48, "int8"), ("int4", 128, 0, "int8")):
        with pytest.raises(NotImplementedError):
            gather_quant(x, perm, *args, 0.9)


# ---------------------------------------------------------------- block channel order (BlockPlan kernel)
def _block_order(K, g, n_out, seed, device, kind="blocks"):
    """A channel order as channel_order="blocks" (or "chunks") makes it, from random outlier scores."""
    from atom_compile.passes.outlier_analysis import block_channel_order, chunk_channel_order

    score_order = torch.randperm(K, generator=torch.Generator().manual_seed(seed))
    make = block_channel_order if kind == "blocks" else chunk_channel_order
    return make(score_order, n_out, g).to(device)


BLOCK_SHAPES = [(576, 64, 128), (576, 128, 64), (1536, 128, 128), (4096, 128, 128), (1024, 64, 0)]


@pytest.mark.parametrize("kind", ["blocks", "chunks"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,g,n_out", BLOCK_SHAPES)
def test_block_plan_kernels(device, dtype, K, g, n_out, kind):
    """The block kernel (runs of 8 or more channels loaded whole, swapped channels patched) against the reference,
    for block and chunk orders: gather_quant bit-exact, rms_norm_quant within the stated bound; random outliers
    leave swapped channels in most groups."""
    from atom_compile.runtime_kernels.quantize import plan_blocks

    perm = _block_order(K, g, n_out, seed=K + g + n_out, device=device, kind=kind)
    plan = plan_blocks(perm, n_out, g, max_swapped=g)
    assert plan is not None and (n_out == 0 or plan.n_swapped > 0)
    assert (plan.base is not None) == (kind == "blocks")  # block orders: one start per group; else the run starts
    M = 19 if K <= 1536 else 5
    x = _rows(M, K, dtype, device, seed=K * 7 + g)
    gen = torch.Generator().manual_seed(K + 1)
    w = (torch.rand(K, generator=gen) + 0.5).to(dtype).to(device)
    for rows in (1, 4):  # one row per program, and 4 (the last program's rows past M masked)
        out = gather_quant(x, plan, "int4", g, n_out, "int8", 0.9, rows_per_program=rows)
        _assert_exact(out, _ref(ops.gather_quant_reference, x, perm, "int4", g, n_out, "int8", 0.9))
        args = (1e-5, perm, "int4", g, n_out, "int8", 0.9)
        out = rms_norm_quant(x, w, 1e-5, plan, *args[2:], rows_per_program=rows)
        _assert_bounded(out, _ref(ops.rms_norm_quant_reference, x, w, *args), dtype, g)


@pytest.mark.parametrize("kind", ["blocks", "chunks"])
@pytest.mark.parametrize("g", [128, 64])
@pytest.mark.parametrize("num_warps", [2, 4, 8])
def test_block_plan_launches(device, num_warps, g, kind):
    """Llama-7B's hidden size with 2, 4 and 8 warps per row: on a GPU the asm patch then takes 2 x 16, 16 and 8
    positions of each half group per thread (the layouts the defaults give at 16k rows and at decode), for groups
    of 128 and of 64."""
    from atom_compile.runtime_kernels.quantize import plan_blocks

    K, n_out = 4096, 128
    perm = _block_order(K, g, n_out, seed=11, device=device, kind=kind)
    plan = plan_blocks(perm, n_out, g)
    assert plan is not None and plan.n_swapped > 0
    M = 300 if device == "cuda" else 3
    x = _rows(M, K, torch.bfloat16, device, seed=5)
    w = (torch.rand(K, generator=torch.Generator().manual_seed(6)) + 0.5).bfloat16().to(device)
    out = gather_quant(x, plan, "int4", g, n_out, "int8", 0.9, num_warps=num_warps)
    _assert_exact(out, _ref(ops.gather_quant_reference, x, perm, "int4", g, n_out, "int8", 0.9))
    out = rms_norm_quant(x, w, 1e-5, plan, "int4", g, n_out, "int8", 0.9, num_warps=num_warps)
    _assert_bounded(out, _ref(ops.rms_norm_quant_reference, x, w, 1e-5, perm, "int4", g, n_out, "int8", 0.9),
                    torch.bfloat16, g)


@pytest.mark.parametrize("x16", [True, "e4m3"])
def test_block_plan_x16_outputs(device, x16):
    """The GEMM-operand outputs (int8 16 * code, e4m3 codes) of the block kernel equal the gather kernel's."""
    from atom_compile.runtime_kernels.quantize import plan_blocks

    K, g, n_out = 1536, 128, 128
    perm = _block_order(K, g, n_out, seed=3, device=device)
    plan = plan_blocks(perm, n_out, g, max_swapped=g)
    x = _rows(9, K, torch.bfloat16, device, seed=77)
    w = (torch.rand(K, generator=torch.Generator().manual_seed(5)) + 0.5).bfloat16().to(device)
    for fn, args in ((gather_quant, (x,)), (rms_norm_quant, (x, w, 1e-6))):
        want = fn(*args, perm, "int4", g, n_out, "int8", 0.9, x16=x16)
        got = fn(*args, plan, "int4", g, n_out, "int8", 0.9, x16=x16)
        for a, b in zip(got, want):
            a = a.view(torch.int8) if a.dtype == torch.float8_e4m3fn else a
            b = b.view(torch.int8) if b.dtype == torch.float8_e4m3fn else b
            assert torch.equal(a.cpu(), b.cpu())


def _order_from_table(plan):
    """The positions' channels as the GPU patch (``_patch_asm``) rebuilds them: each group's block, then per chunk
    pair the halves its prmt selectors take from the two inline swaps, then its listed swaps past those (host
    emulation of what the table means, indices counted as the kernel's table pointer counts them)."""
    from atom_compile.runtime_kernels.quantize import PATCH_INLINE

    g, half, G = plan.group_size, plan.group_size // 2, plan.n_groups
    words = [int(w) for w in plan.table.cpu()[2:]]  # (the kernel's table pointer skips head 0: no swap)
    identity = int(plan.table[0])
    assert identity & 0xFFFF0000 == 0 and (identity + 2) % 4 == 0  # count 0; bodies 16-byte aligned (v4 loads)
    assert words[identity: identity + 4] == [0x32103210] * 4
    order = plan.cols.cpu().long()[: G * g].clone()
    for pair in range(len(plan.cols) // 16):
        head, chans = words[2 * pair], [words[2 * pair + 1] & 0xFFFF, words[2 * pair + 1] >> 16]
        count = head >> 16
        assert (head & 0xFFFF) % 8 == identity % 8
        if count == 0:
            assert head == identity
            continue
        body = words[head & 0xFFFF: (head & 0xFFFF) + 5]
        first = (pair // (half // 8)) * g + 8 * (pair % (half // 8))  # the pair's lo chunk

        def position(slot):  # slot 0-7: the lo chunk's 8 positions, 8-15: the hi chunk's
            return first + slot + (half - 8 if slot >= 8 else 0)

        for r in range(8):
            sel = (body[r // 2] >> (16 * (r % 2))) & 0xFFFF
            for h in range(2):
                nib = [(sel >> (4 * (2 * h + b))) & 0xF for b in range(2)]
                if nib == [2 * h, 2 * h + 1]:
                    continue  # kept
                assert nib[0] in (4, 6) and nib[1] == nib[0] + 1, hex(sel)
                assert (nib[0] - 4) // 2 < count
                order[position(2 * r + h)] = chans[(nib[0] - 4) // 2]
        for w in words[body[4]: body[4] + max(0, count - PATCH_INLINE)]:
            order[position(w >> 16)] = w & 0xFFFF
    return order


@pytest.mark.parametrize("K,g,n_out", BLOCK_SHAPES)
def test_block_plan_table(K, g, n_out):
    """The GPU patch's table rebuilds the order (host emulation, so it is checked in CI too): block and chunk
    orders from random outliers, and a random order with every position swapped (16 swaps per chunk pair)."""
    from atom_compile.runtime_kernels.quantize import plan_blocks

    for perm in (_block_order(K, g, n_out, seed=K + g, device="cpu"),
                 _block_order(K, g, n_out, seed=K + g, device="cpu", kind="chunks"),
                 torch.randperm(K, generator=torch.Generator().manual_seed(g))):
        plan = plan_blocks(perm, n_out, g, max_swapped=g)
        assert torch.equal(_order_from_table(plan), perm[: K - n_out])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_plan_edges(device, dtype):
    """plan_blocks: an order with no swaps, a block moved whole, a run of 8 moved whole, a group mostly swapped
    (refused by default, exact
    when allowed), an order that is not made of blocks (refused), and a plan used with another shape (an error).
    bf16 rows take the GPU's asm patch, fp32 rows its per-position loads."""
    from atom_compile.runtime_kernels.quantize import plan_blocks

    K, g, n_out = 576, 64, 64
    x = _rows(6, K, dtype, device, seed=8)
    ident = torch.arange(K, device=device)
    plan = plan_blocks(ident, n_out, g)
    assert plan is not None and plan.n_swapped == 0
    _assert_exact(gather_quant(x, plan, "int4", g, n_out, "int8", 0.9),
                  _ref(ops.gather_quant_reference, x, ident, "int4", g, n_out, "int8", 0.9))
    whole = ident.clone()
    whole[64:128], whole[512:576] = ident[512:576], ident[64:128]  # group 1 is the last block entirely
    plan = plan_blocks(whole, n_out, g)
    assert plan is not None and plan.n_swapped == 0
    _assert_exact(gather_quant(x, plan, "int4", g, n_out, "int8", 0.9),
                  _ref(ops.gather_quant_reference, x, whole, "int4", g, n_out, "int8", 0.9))
    runs = ident.clone()  # group 1's third run of 8 and an aligned run of the outlier block trade places
    runs[80:88], runs[520:528] = ident[520:528], ident[80:88]
    plan = plan_blocks(runs, n_out, g)
    assert plan is not None and plan.n_swapped == 0 and plan.base is None  # (the run starts path)
    _assert_exact(gather_quant(x, plan, "int4", g, n_out, "int8", 0.9),
                  _ref(ops.gather_quant_reference, x, runs, "int4", g, n_out, "int8", 0.9))
    mixed = ident.clone()  # 40 of group 1's 64 positions from the outlier block, off the 8-channel alignment
    mixed[64:84], mixed[513:533] = ident[513:533], ident[64:84]
    mixed[84:104], mixed[545:565] = ident[545:565], ident[84:104]
    assert plan_blocks(mixed, n_out, g) is None  # 40 swapped positions > the default 32
    plan = plan_blocks(mixed, n_out, g, max_swapped=40)
    assert plan.n_swapped == 40
    _assert_exact(gather_quant(x, plan, "int4", g, n_out, "int8", 0.9),
                  _ref(ops.gather_quant_reference, x, mixed, "int4", g, n_out, "int8", 0.9))
    shuffled = torch.randperm(K, generator=torch.Generator().manual_seed(1)).to(device)
    assert plan_blocks(shuffled, n_out, g) is None
    plan = plan_blocks(shuffled, n_out, g, max_swapped=g)  # allowed: every position patched, still exact
    _assert_exact(gather_quant(x, plan, "int4", g, n_out, "int8", 0.9),
                  _ref(ops.gather_quant_reference, x, shuffled, "int4", g, n_out, "int8", 0.9))
    with pytest.raises(ValueError, match="BlockPlan"):
        gather_quant(x, plan, "int4", 128, 64, "int8", 0.9)
