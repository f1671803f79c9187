"""The paper's ablation ladder (Atom, Table 4) on any model: each step adds one technique.

    RTN W4A4 -> + outliers kept in fp16 -> + outliers in INT8 -> + groups -> + clipping -> + GPTQ -> + KV4
    reference points: W8A8, W4A16, W3A3 (Atom with 3 bits), and two steps of ours after the paper's:
    + KV Hadamard rotation (RotateKVHeads) and + a per-group MSE-optimal weight clip ratio.

``base`` holds the knobs every step shares (group size and outlier count, e.g. the reference setup's 64/64).
"""

from __future__ import annotations

from atom_compile.config import AtomConfig, get_config

PAPER_LLAMA7B = {  # WikiText2 perplexity, Llama-7B, seqlen 2048 (Atom, Table 4)
    "fp": 5.68, "rtn-w4a4": 2315, "+outliers-fp16": 11.34, "+outliers-int8": 11.39, "+groups": 6.22,
    "+clipping": 6.13, "+gptq": 6.04, "+kv4": 6.16,
}


def ladder(group_size: int = 128, n_outliers: int = 128, **base) -> dict[str, AtomConfig]:
    """name -> config for every step of the ladder plus the reference points."""
    rtn = get_config("rtn-w4a4", **base)
    steps = {"rtn-w4a4": rtn}
    steps["+outliers-fp16"] = rtn.replace(name="+outliers-fp16", n_outliers=n_outliers, outlier_format="fp16")
    steps["+outliers-int8"] = steps["+outliers-fp16"].replace(name="+outliers-int8", outlier_format="int8")
    steps["+groups"] = steps["+outliers-int8"].replace(name="+groups", group_size=group_size)
    steps["+clipping"] = steps["+groups"].replace(name="+clipping", weight_clip=0.85, act_clip=0.9)
    steps["+gptq"] = steps["+clipping"].replace(name="+gptq", weight_method="gptq")
    steps["+kv4"] = steps["+gptq"].replace(name="+kv4", kv_bits=4)
    steps["+kv-rotation"] = steps["+kv4"].replace(name="+kv-rotation", kv_rotation=True)
    steps["+mse-clip"] = steps["+kv-rotation"].replace(name="+mse-clip", weight_clip_search=True)
    steps["w8a8"] = get_config("w8a8", **base)
    steps["w4a16"] = get_config("w4a16", group_size=group_size, **base)
    steps["w3a3"] = steps["+kv4"].replace(name="w3a3", weight_format="int3", act_format="int3")
    return steps
