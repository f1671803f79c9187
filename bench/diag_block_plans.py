"""How many of SmolLM2's ordered quantizer inputs get a BlockPlan with channel_order="blocks" or "chunks" (CPU, no
GPU needed).

Compiles the bundled SmolLM2-135M with atom-w4a4-rtn and the order (32 calibration windows of 512 tokens from the
bundled text), then asks ``plan_blocks`` about every layer's order (input norm, o_proj input, post-attention norm),
with the default threshold and without one (for the swap counts).

    python -m bench.diag_block_plans > bench/results/diag_block_plans_smollm2.txt
    python -m bench.diag_block_plans --order chunks > bench/results/diag_chunk_plans_smollm2.txt
"""

from __future__ import annotations

import argparse

import atom_compile
from atom_compile.config import get_config
from atom_compile.data import BUNDLED_CALIB, read_text
from atom_compile.runtime_kernels.quantize import BLOCK_MAX_SWAPPED_FRACTION, plan_blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--order", default="blocks", choices=["blocks", "chunks"])
    order = ap.parse_args().order
    model, tok = atom_compile.load_model("smollm2-135m")
    cfg = get_config("atom-w4a4-rtn", channel_order=order)
    q = atom_compile.compile(model, [read_text(BUNDLED_CALIB)], cfg, tokenizer=tok, calib_samples=32,
                             calib_seqlen=512, progress=False)
    total = accepted = worst = 0
    swapped = []
    for gm in q.layers:
        for n in gm.graph.nodes:
            if n.op == "get_attr" and n.target.endswith("_perm"):
                perm = getattr(gm, n.target)
                spec = cfg.resolve(perm.numel())
                g, n_out = spec.group_size, spec.n_outliers
                total += 1
                accepted += plan_blocks(perm, n_out, g) is not None
                full = plan_blocks(perm, n_out, g, max_swapped=g)
                worst = max(worst, int((full.src != 0).view(-1, g).sum(1).max()))
                swapped.append(full.n_swapped)
    print(f"SmolLM2, channel_order={order}, threshold {BLOCK_MAX_SWAPPED_FRACTION} of a group: {accepted} of {total} "
          f"orders get a plan; most swapped positions in one group: {worst}; swapped positions per order: "
          f"{min(swapped)}-{max(swapped)} of {q.layers[0].input_layernorm_perm.numel() - n_out}")


if __name__ == "__main__":
    main()
