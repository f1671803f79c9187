#!/usr/bin/env bash
# The accuracy runs of docs/accuracy.md on one CUDA GPU, with the reference ops in float32 (exact integer
# semantics, as on the CPU; a GPU only makes the 13 compiles and evaluations fit in minutes).
#
#   GGUF=path/to/SmolLM2-135M-Instruct.Q4_1.gguf DATA=../shared/data OUT=docs/results bench/run_accuracy_gpu.sh
#
# On the lent device machine the package is not installed: it runs from the checkout (PYTHONPATH) with the
# passes/lowering/runtime_kernels folders linked into atom_compile/ the way pyproject.toml maps them.
set -euo pipefail
: "${GGUF:?set GGUF to the SmolLM2 .gguf file}" "${OUT:?set OUT to a results folder}"
DATA=${DATA:-../shared/data}
if ! python3 -c "import atom_compile.passes" 2>/dev/null; then
  for d in passes lowering runtime_kernels; do ln -sfn "../$d" "atom_compile/$d"; done
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
run() { python3 -m atom_compile.cli "$@" --model "$GGUF" --device cuda --dtype float32 --backend reference; }
TEXTS=(--text-file "$DATA/enwiki_eval.txt" --text-file "$DATA/lee_news.txt" --max-tokens 40960 --seqlen 512)
CALIB=(--calib-file "$DATA/enwiki_calib.txt" --calib-samples 128 --calib-seqlen 512)

# 1. The paper's ladder on the reference setup: groups of 64, 64 outliers.
run ablate "${CALIB[@]}" "${TEXTS[@]}" --group-size 64 --n-outliers 64 \
  --out "$OUT/ablation_smollm2_ref.json" --png "$OUT/ablation_smollm2_ref.png" 2>"$OUT/ablation.log"
# 2. The presets as shipped (the adaptation rule's sizes), with and without the KV rotation.
run eval --configs fp,rtn-w4a4,w8a8,w4a16,atom-w4a4-rtn,atom-w4a4 --set kv_rotation=false "${CALIB[@]}" "${TEXTS[@]}" \
  --out "$OUT/presets_no_kv_rotation.json" 2>>"$OUT/eval.log"
run eval --configs atom-w4a4-rtn,atom-w4a4 --set kv_rotation=true "${CALIB[@]}" "${TEXTS[@]}" \
  --out "$OUT/presets_kv_rotation.json" 2>>"$OUT/eval.log"
