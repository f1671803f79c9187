"""W4A4 GEMM kernel (runtime_kernels/w4a4_gemm.py) against ``atom_compile.ops.quant_linear_reference``.

Inputs are fresh random activations with a few large outlier channels (never zeros) and random weights,
quantized with ``atom_compile.quant.quantize_rows`` (int4 groups, int8 outliers). Every group's integer
dot product is exact in both implementations; only the fp32 scaling and summation order differ, so the
bounds are ||out - ref|| / ||ref|| < 1e-5 for fp32 output and < 1e-2 for bf16 output (bf16 rounding of
the result, 2^-9 relative, dominates). On a machine without a GPU the kernels run under Triton's CPU
interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from atom_compile import quant
from atom_compile.ops import quant_linear_reference
from atom_compile.runtime_kernels.w4a4_gemm import Config, prepare_weight, unpack_activations, w4a4_gemm

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def with_outliers(*shape, seed, scale=30.0, n_out=0, device="cpu"):
    """Gaussian activations; the last ``n_out`` channels (the outlier channels after reordering) and a few
    random normal channels are blown up, as real LLM activations are."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    cols = torch.randperm(shape[-1] - n_out, generator=g)[: max(1, shape[-1] // 100)]
    x[..., cols] *= 4.0
    if n_out:
        x[..., -n_out:] *= scale
    return x.to(device)


def make_case(M, N, K, group, n_out, seed, device, bias=True):
    x = with_outliers(M, K, seed=seed, n_out=n_out, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    w = (torch.randn(N, K, generator=g) * 0.05).to(device)
    xq = quant.quantize_rows(x, "int4", group, n_out, "int8", 0.9)
    wq = quant.quantize_rows(w, "int4", group, n_out, "int8", 0.85)
    b = (torch.randn(N, generator=g)).to(device) if bias else None
    return xq, wq, b


def reference(xq, wq, b, group, dtype):
    return quant_linear_reference(*xq, *wq, b, "int4", "int4", group, "int8", 1, dtype)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(xq, wq, b, group, dtype, config=None):
    pw = prepare_weight(*wq, group)
    M, N = xq[0].shape[0], wq[0].shape[0]
    out = torch.full((M, N), float("nan"), dtype=dtype, device=xq[0].device)  # poison: every element must be written
    y = w4a4_gemm(*xq, pw, b, dtype, config=config, out=out)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype and y.shape == (M, N)
    assert not torch.isnan(y).any(), "unwritten output elements"
    assert int(pw.counters.abs().sum()) == 0, "split-K counters not re-armed"
    ref = reference(xq, wq, b, group, torch.float32)
    err = rel_err(y, ref)
    assert err < TOL[dtype], f"rel err {err:.3g} >= {TOL[dtype]}"
    return y, ref


# (K, group, n_out): Kn = 512 (4 groups of 128), Kn = 1408 (11 groups, 128 outliers), Kn = 512 in groups of 64
SHAPES = [(576, 128, 64), (1536, 128, 128), (576, 64, 64)]


@pytest.mark.parametrize("M", [1, 16, 37])
@pytest.mark.parametrize("K,group,n_out", SHAPES)
@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.bfloat16, False)])
def test_matches_reference(device, M, K, group, n_out, dtype, bias):
    xq, wq, b = make_case(M, 96, K, group, n_out, seed=10 * M + K + group, device=device, bias=bias)
    check(xq, wq, b, group, dtype)


@pytest.mark.parametrize("dtype,bias", [(torch.float32, False), (torch.bfloat16, True)])
def test_other_bias_dtype_combinations(device, dtype, bias):
    xq, wq, b = make_case(16, 96, 1536, 128, 128, seed=7, device=device, bias=bias)
    check(xq, wq, b, 128, dtype)


# Configurations the GPU heuristics and the autotuner use, at interpreter-friendly sizes: split-K with an
# uneven last split (11 groups over 3, 4 and 5 splits), the outliers as one more split, no split, the
# pre-unpacked activation path, the magic-number int -> float conversion, N and M tails.
CONFIGS = [
    Config(block_n=32, block_m=16, split_k=3, num_stages=1),
    Config(block_n=64, block_m=32, split_k=4, num_stages=1, x_unpacked=True),
    Config(block_n=16, block_m=64, split_k=1, num_stages=1),
    Config(block_n=64, block_m=16, split_k=1, num_stages=1, x_unpacked=True, magic=True),
    Config(block_n=16, block_m=16, split_k=5, num_stages=1, out_split=True),
    Config(block_n=32, block_m=64, split_k=2, num_stages=1, x_unpacked=True, out_split=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"n{c.block_n}m{c.block_m}s{c.split_k}"
                         f"{'x' if c.x_unpacked else ''}{'magic' if c.magic else ''}{'o' if c.out_split else ''}")
def test_configs(device, config):
    xq, wq, b = make_case(37, 80, 1536, 128, 128, seed=3, device=device)
    check(xq, wq, b, 128, torch.float32, config)


@pytest.mark.parametrize("config", [None, Config(block_n=32, block_m=16, split_k=3, num_stages=1)],
                         ids=["default", "n32m16s3"])
def test_activations_given_unpacked(device, config):
    """x_unpacked=True: the int8 (16 x code) activations of unpack_activations go straight in; same result as
    the packed input (bit-equal: the same integer dots and the same scaling order)."""
    xq, wq, b = make_case(37, 80, 1536, 128, 128, seed=8, device=device)
    pw = prepare_weight(*wq, 128)
    x16 = unpack_activations(xq[0], 128)
    assert x16.shape == (37, 1408)
    y = w4a4_gemm(x16, *xq[1:], pw, b, torch.float32, config=config, x_unpacked=True)
    ref = reference(xq, wq, b, 128, torch.float32)
    assert rel_err(y, ref) < TOL[torch.float32]
    cfg = config and dataclasses.replace(config, x_unpacked=True)
    assert torch.equal(y, w4a4_gemm(*xq, pw, b, torch.float32, config=cfg))
    with pytest.raises(ValueError, match="unpacked"):
        w4a4_gemm(xq[0], *xq[1:], pw, b, torch.float32, x_unpacked=True)


def test_fp16_output_and_no_outliers(device):
    xq, wq, b = make_case(5, 64, 512, 128, 0, seed=4, device=device)
    assert xq[2].shape[-1] == 0
    check(xq, wq, b, 128, torch.float32)
    pw = prepare_weight(*wq, 128)
    y = w4a4_gemm(*xq, pw, b, torch.float16)
    assert y.dtype == torch.float16 and rel_err(y, reference(xq, wq, b, 128, torch.float32)) < 1e-2


def test_repeated_calls_are_deterministic(device):
    """The split-K reduction sums partials in split order whoever arrives last: bit-identical results."""
    xq, wq, b = make_case(16, 96, 1536, 128, 128, seed=5, device=device)
    pw = prepare_weight(*wq, 128)
    cfg = Config(block_n=32, block_m=16, split_k=4, num_stages=1)
    y1 = w4a4_gemm(*xq, pw, b, torch.float32, config=cfg)
    y2 = w4a4_gemm(*xq, pw, b, torch.float32, config=cfg)
    assert torch.equal(y1, y2)


def test_worst_case_codes_are_exact(device):
    """All codes -8 and outliers -127: the largest group sums (x256 inside the kernel: 2^21) stay exact."""
    M, N, g = 3, 32, 128
    xq = quant.pack_nibbles(torch.full((M, 256), -8, dtype=torch.int8), g).to(device)
    wq = quant.pack_nibbles(torch.full((N, 256), -8, dtype=torch.int8), g).to(device)
    xo = torch.full((M, 128), -127, dtype=torch.int8, device=device)
    wo = torch.full((N, 128), -127, dtype=torch.int8, device=device)
    ones = lambda r, c: torch.ones(r, c, device=device)  # noqa: E731
    y = w4a4_gemm(xq, ones(M, 2), xo, ones(M, 1), prepare_weight(wq, ones(N, 2), wo, ones(N, 1), g), None,
                  torch.float32)
    expect = 2 * 128 * 64 + 128 * 127 * 127
    assert torch.equal(y, torch.full_like(y, float(expect)))


def test_rejects_bad_inputs(device):
    xq, wq, b = make_case(4, 32, 576, 128, 64, seed=6, device=device)
    pw = prepare_weight(*wq, 128)
    with pytest.raises(ValueError):
        w4a4_gemm(xq[0][:, :-1], *xq[1:], pw)
    with pytest.raises(ValueError):
        w4a4_gemm(xq[0], xq[1][:, :-1], *xq[2:], pw)
    with pytest.raises(ValueError):
        prepare_weight(wq[0], wq[1][:, :-1], wq[2], wq[3], 128)
    with pytest.raises(ValueError):
        prepare_weight(*wq, 96)


# ============================================================================ autotuned configurations on disk
def test_autotune_cache_round_trip(tmp_path):
    from atom_compile.runtime_kernels.w4a4_gemm import load_tuned, save_tuned

    path = tmp_path / "sub" / "w4a4_autotune.json"
    assert load_tuned(path, "gpu A") == {}  # no file yet
    a = Config(block_n=128, block_m=64, split_k=3, num_stages=5, x_unpacked=True)
    b = Config(block_n=32, split_k=1, num_stages=8)
    save_tuned(path, "gpu A", "16,4096,31,128,128,1", a)
    save_tuned(path, "gpu A", "64,4096,31,128,128,1", b)
    save_tuned(path, "gpu B", "16,4096,31,128,128,1", b)
    assert load_tuned(path, "gpu A") == {"16,4096,31,128,128,1": a, "64,4096,31,128,128,1": b}
    assert load_tuned(path, "gpu B") == {"16,4096,31,128,128,1": b}
    assert load_tuned(path, "gpu C") == {}
    assert not list(path.parent.glob("*.tmp"))  # written through a renamed temporary file


def test_autotune_cache_ignores_bad_files_and_entries(tmp_path):
    import json

    from atom_compile.runtime_kernels.w4a4_gemm import load_tuned, save_tuned

    path = tmp_path / "w4a4_autotune.json"
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring the W4A4 autotune cache"):
        assert load_tuned(path, "gpu A") == {}
    good = Config(block_n=64, split_k=2)
    save_tuned(path, "gpu A", "s", good)  # rewrites the unreadable file
    assert load_tuned(path, "gpu A") == {"s": good}
    data = json.loads(path.read_text())
    data["gpu A"]["unknown field"] = dict(dataclasses.asdict(good), tile_k=64)
    data["gpu A"]["wrong type"] = dict(dataclasses.asdict(good), split_k="2")
    data["gpu A"]["bool for int"] = dict(dataclasses.asdict(good), num_warps=True)
    data["gpu A"]["not a dict"] = [64, 16]
    path.write_text(json.dumps(data))
    assert load_tuned(path, "gpu A") == {"s": good}


def test_tuned_config_times_once_per_size_across_processes(tmp_path, monkeypatch):
    """The first process times and stores; a later one (empty in-memory choices) reads the file and times nothing;
    during CUDA-graph capture (may_time=False) nothing stored means no choice (the caller takes pick_config)."""
    import importlib

    wg = importlib.import_module("atom_compile.runtime_kernels.w4a4_gemm")  # (the package exports the function)
    monkeypatch.setenv("ATOM_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(wg, "_TUNED", {})
    monkeypatch.setattr(wg, "_DISK", {})
    timed = []
    best = Config(block_n=128, block_m=16, split_k=4, num_stages=5)

    def tune():
        timed.append(1)
        return best

    key = (0, 16, 4096, 31, 128, 128, True)
    assert wg.tuned_config(key, "gpu A", tune, may_time=True) == best and len(timed) == 1
    assert wg.tuned_config(key, "gpu A", tune, may_time=True) == best and len(timed) == 1  # this process: memory
    assert wg.autotune_cache_path() == tmp_path / "w4a4_autotune.json" and wg.autotune_cache_path().exists()
    monkeypatch.setattr(wg, "_TUNED", {})  # a new process
    monkeypatch.setattr(wg, "_DISK", {})
    assert wg.tuned_config(key, "gpu A", tune, may_time=False) == best and len(timed) == 1  # from the file
    other = (0, 64, 4096, 31, 128, 128, True)
    assert wg.tuned_config(other, "gpu A", tune, may_time=False) is None and len(timed) == 1
    monkeypatch.setattr(wg, "_TUNED", {})  # a process on another GPU model or software: the file's entry is not used
    assert wg.tuned_config(key, "gpu B", tune, may_time=False) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the autotuner times on a GPU")
def test_autotuned_gemm_reuses_the_stored_choice(tmp_path, monkeypatch):
    import importlib

    wg = importlib.import_module("atom_compile.runtime_kernels.w4a4_gemm")
    monkeypatch.setenv("ATOM_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(wg, "_TUNED", {})
    monkeypatch.setattr(wg, "_DISK", {})
    monkeypatch.setattr(wg, "_AUTOTUNE", True)
    xq, wq, _ = make_case(16, 256, 576, 128, 64, seed=9, device="cuda")
    pw = prepare_weight(*wq, 128)
    y1 = w4a4_gemm(*xq, pw)
    stored = wg.load_tuned(wg.autotune_cache_path(), wg.device_key(y1.device))
    assert len(stored) == 1
    monkeypatch.setattr(wg, "_TUNED", {})  # a new process: reads the file, times nothing
    monkeypatch.setattr(wg, "_DISK", {})
    monkeypatch.setattr(wg, "_autotune", lambda *a, **k: pytest.fail("timed again"))
    y2 = w4a4_gemm(*xq, pw)
    assert torch.equal(y1, y2) and list(wg._TUNED.values()) == list(stored.values())
