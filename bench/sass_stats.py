"""Instruction counts of the attention kernels' inner loops, compiled for sm_90 on this machine (no GPU needed).

Compiles a kernel with Triton's Hopper backend, assembles the PTX with Triton's bundled ptxas, disassembles with
its cuobjdump, and counts the SASS instructions between the target and the source of the longest backward branch
(the key loop). Also prints registers, shared memory and the wgmma waits Triton placed (pendings = 0: the dot is
waited on right after it is issued). The figures quoted in docs/performance.md for the row kernel (instructions
per 16-key tile, registers), the GQA decode kernel and the prefill kernel come from here.

    python -m bench.sass_stats > bench/results/sass_stats_sm90.txt
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from atom_compile.runtime_kernels import kv_attention as ka

_PTRS = dict(kc_ptr="*u8", kp_ptr="*i32", vc_ptr="*u8", vp_ptr="*i32", lens_ptr="*i32", po_ptr="*fp32",
             pml_ptr="*fp32")
_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_sm90(fn, const: dict, num_warps: int, num_stages: int, maxnreg: int | None = None, dtype: str = "bf16",
                 ptrs: dict | None = None, floats: tuple = ("qk_scale",), options: dict | None = None):
    """``fn`` compiled for sm_90 with ``const`` as its constexprs; pointers 16-byte aligned, like the launches.
    ``ptrs`` / ``floats``: pointer types and fp32 scalars of kernels other than the attention ones."""
    ptrs = ptrs or dict(_PTRS, q_ptr=f"*{dtype}", o_ptr=f"*{dtype}")
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        sig[a] = ptrs.get(a) or ("constexpr" if a in const else "fp32" if a in floats else "i32")
        if a in ptrs or (a.startswith("stride_") and a not in ("stride_kps", "stride_vps")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()}, attrs=attrs)
    opts = dict(num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}), **(options or {}))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def loop_stats(kernel) -> dict:
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        r = subprocess.run([os.path.join(_TOOLS, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o", cubin],
                           capture_output=True, text=True, check=True)
        sass = subprocess.run([os.path.join(_TOOLS, "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    regs = int(re.search(r"Used (\d+) registers", r.stderr).group(1))
    lines = [(int(m.group(1), 16), line) for line in sass.splitlines() if (m := re.match(r"\s+/\*([0-9a-f]{4,})\*/", line))]
    loop = None
    for addr, line in lines:
        m = re.search(r"BRA 0x([0-9a-f]+)", line)
        if m and int(m.group(1), 16) < addr and (loop is None or addr - int(m.group(1), 16) > loop[1] - loop[0]):
            loop = (int(m.group(1), 16), addr)
    body = [line for addr, line in lines if loop and loop[0] <= addr <= loop[1]]
    ops = collections.Counter()
    for line in body:
        toks = line.split()[1:]
        ops[(toks[1] if toks[0].startswith("@") else toks[0]).split(".")[0].rstrip(";")] += 1
    waits = re.findall(r"warp_group_dot_wait[^\n]*?pendings = (\d+)", kernel.asm["ttgir"])
    return dict(registers=regs, shared_bytes=kernel.metadata.shared, loop_instructions=len(body),
                kernel_instructions=len(lines), top=ops.most_common(10), wgmma_waits_pendings=waits)


CASES = {
    # MHA decode: the CUDA-core row kernel as attention_config launches it (16 keys, 1 warp, 8 slots, 16-bit q)
    "row kernel, MHA decode (per 16-key tile, one warp)": (
        ka._attn_decode_row_kernel,
        dict(D=128, BLOCK_N=16, SPLIT=False, OUT_BF16=True, INTERP_LOOP=False, MAX_TILES=1,
             UNPACK=ka.UNPACK_OFFSET, ACC_ROWS=8), 1, 1, None),
    # GQA decode (4 query heads per KV head): the tensor-core kernel, 16 rows, 128 keys, 4 warps, split-KV
    "tensor-core kernel, GQA decode (per 128-key tile, per warp)": (
        ka._attn_fwd_kernel,
        dict(GROUP=4, D=128, BLOCK_M=16, BLOCK_N=128, SPLIT=True, QK_DTYPE=tl.float16, PV_DTYPE=tl.float16,
             IEEE=False, OUT_BF16=True, INTERP_LOOP=False, MAX_TILES=1, FAST_UNPACK=True, CAUSAL=False), 4, 3, 168),
    # prefill: 64 query rows x 128 keys, causal, 4 warps
    "tensor-core kernel, prefill (per 64 x 128 tile, per warp)": (
        ka._attn_fwd_kernel,
        dict(GROUP=1, D=128, BLOCK_M=64, BLOCK_N=128, SPLIT=False, QK_DTYPE=tl.float16, PV_DTYPE=tl.float16,
             IEEE=False, OUT_BF16=True, INTERP_LOOP=False, MAX_TILES=1, FAST_UNPACK=True, CAUSAL=True), 4, 3, None),
}


# The norm / gather quantizers for the block channel order, as _blocks_launch runs them at 16k x 4096 (bf16, groups
# of 128, 128 INT8 outliers, one row per program, 4 warps, clip 0.9): no loop, so the whole kernel is counted.
_Q_PTRS = dict(x_ptr="*bf16", w_ptr="*bf16", base_ptr="*i32", starts_ptr="*i32", src_ptr="*i16", table_ptr="*i32",
               outl_ptr="*i32", q_ptr="*i8", s_ptr="*fp32", o_ptr="*i8", os_ptr="*fp32")
_Q_CONST = dict(X_DTYPE=tl.bfloat16, Y_DTYPE=tl.bfloat16, GROUP=128, N_GROUPS=31, G_PAD=32, N_OUT=128, ROWS=1,
                NATIVE=True, X16=0, PREFETCH=False, CLAMP_LOW=False, PATCH_PAIRS=2, BLOCKS=True)
QUANTIZER_CASES = {
    "block kernel, rms_norm_quant (one row, whole kernel)": dict(_Q_CONST, NORM=True),
    "block kernel, gather_quant (one row, whole kernel)": dict(_Q_CONST, NORM=False),
    "block kernel on a chunk order (run starts), rms_norm_quant": dict(_Q_CONST, NORM=True, BLOCKS=False),
}


def main() -> None:
    print(f"# sm_90 (Hopper), Triton {triton.__version__}; SASS of the longest loop")
    for name, (fn, const, nw, ns, maxnreg) in CASES.items():
        st = loop_stats(compile_sm90(fn, const, nw, ns, maxnreg))
        print(f"{name}: {st['registers']} registers, {st['shared_bytes']} B shared, "
              f"{st['loop_instructions']} loop instructions; wgmma waits (pendings): {st['wgmma_waits_pendings']}")
        print("    " + ", ".join(f"{op} {n}" for op, n in st["top"]))
    from atom_compile.runtime_kernels import quantize as rq

    for name, const in QUANTIZER_CASES.items():
        st = loop_stats(compile_sm90(rq._row_blocks_quant_kernel, const, 4, 1, ptrs=_Q_PTRS, floats=("eps", "clip"),
                                     options=rq._EXACT))
        print(f"{name}: {st['registers']} registers, {st['shared_bytes']} B shared, "
              f"{st['kernel_instructions']} instructions (static, slow paths included)")


if __name__ == "__main__":
    main()
