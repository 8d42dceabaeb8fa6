#!/usr/bin/env bash
# README command 1: set up, then serve SmolLM2-135M-Instruct plus the canary adapter on localhost:8000.
# First run: installs, converts the GGUF once (~15 s) and trains the canary once (~30 s); both cached.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
BASE=$(python -c "from loraserve.demo.canary import smollm2_gguf; print(smollm2_gguf())")
CANARY=$(python -m loraserve.demo.canary | tail -n 1)
PORT=${PORT:-8000}
cat <<MSG
Serving on http://127.0.0.1:$PORT: model "smollm2" (the base) and "canary" (the adapter). Try:
  curl -s localhost:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "canary", "messages": [{"role": "user", "content": "Where do penguins live?"}], "max_tokens": 20, "temperature": 0}'
  (and the same with "model": "smollm2")
MSG
exec loraserve serve "$BASE" --served-model-name smollm2 --enable-lora --lora-modules "canary=$CANARY" \
  --port "$PORT" "$@"
