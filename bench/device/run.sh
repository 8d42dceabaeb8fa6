#!/usr/bin/env bash
# Runs ON a lent GPU machine (the `device` tool), after bench/device/prepare.sh filled .gpu/ here:
#   device run  carry=[".gpu"]  command="bash bench/device/run.sh"
# 1. installs the carried wheels (the image has torch + CUDA but not loraserve's server stack);
# 2. bench/throughput.py unchanged on CUDA, against a random-weight model of SmolLM2-135M's shape
#    (the real weights do not fit the carry limit; speed does not depend on their values);
# 2b. bench/device/cuda_smoke.py first: the engine on CUDA in a few configurations, each one's traceback
#    printed, so one call says which part fails;
# 3. the PEFT/transformers parity and isolation tests with their tiny models on CUDA
#    (LORASERVE_TEST_DEVICE=cuda; engines take their device from the model).
# Everything lands in $OUT (log.txt, throughput.json, junit.xml). Stage budgets keep it inside one call.
set -u
OUT=${OUT:-/tmp/device-out}
BENCH_S=${BENCH_S:-150}
TESTS_S=${TESTS_S:-90}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
cd "$(dirname "$0")/../.."
echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/.gpu/site:$PWD
export LORASERVE_CACHE=/tmp/lscache TORCH_EXTENSIONS_DIR=/tmp/ext PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, peft, fastapi, openai; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__)"

echo "== random-weight SmolLM2-135M on disk"
python3 - <<'PY'
import shutil, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(".gpu/smol-config"), Path("/tmp/smol-random")
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.bfloat16)
model.save_pretrained(dst)
for f in src.iterdir():
    if f.name != "config.json":
        shutil.copy(f, dst)
print("saved", dst, sum(p.numel() for p in model.parameters()) / 1e6, "M parameters")
PY

echo "== engine smoke on CUDA"
timeout ${SMOKE_S:-60} python3 bench/device/cuda_smoke.py /tmp/smol-random

echo "== bench/throughput.py on CUDA"
timeout "$BENCH_S" python3 bench/throughput.py --model /tmp/smol-random --out "$OUT/throughput.json" ${BENCH_ARGS:-}
echo "bench rc=$?"

echo "== parity and isolation tests with their models on CUDA"
# (the C++ CPU-kernel variants are deselected: they are CPU-only, and CI runs them)
LORASERVE_TEST_DEVICE=cuda timeout "$TESTS_S" python3 -m pytest -q -p no:cacheprovider -n ${TEST_WORKERS:-8} \
  --timeout 120 --junitxml="$OUT/junit.xml" -rf -k "not cpp" \
  ${TEST_ARGS:-tests/test_engine_parity.py tests/test_engine_lora.py tests/test_lora_parity.py} 2>&1 | tail -120
echo "tests rc=${PIPESTATUS[0]}"
