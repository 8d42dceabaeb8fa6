# loraserve in a container, with a HEALTHCHECK that proves the adapter is applied, not just that the
# port answers: `loraserve verify` asks base and adapter the same prompts at temperature 0 and fails
# (container "unhealthy") if the adapter is missing or answers like the base. See README "Tools".
#
#   docker build -t loraserve .
#   docker run -p 8000:8000 -v /path/to/model:/models/base -v /path/to/adapter:/adapters/adapter \
#       -e LORASERVE_EXPECT="text the adapter always says" loraserve
#   docker inspect --format '{{json .State.Health}}' <container>
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
# The CPU build of the pinned torch; for CUDA use a CUDA base image and drop --index-url.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# g++ builds the CPU bf16 GEMM, decode-attention, multi-LoRA and layer-op kernels (loraserve/model/csrc); without it the
# PyTorch paths run.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY loraserve ./loraserve
RUN pip install .
# Build the kernels into the image, so a container does not compile them (~20 s each) at start. They are
# built for the build machine's CPU; on a CPU with other features the server builds its own at first start.
# (The GEMM is None where the build machine has no AVX512-BF16: oneDNN then.)
RUN python -c "from loraserve.model import kernels as k; assert k.paged_attention() and k.multi_lora() and k.layer_ops(); k.gemm()"

# What to serve; override with -e. LORASERVE_EXPECT may stay empty (then any difference from the base passes).
ENV LORASERVE_MODEL=/models/base \
    LORASERVE_BASE=base \
    LORASERVE_ADAPTER=adapter \
    LORASERVE_ADAPTER_PATH=/adapters/adapter \
    LORASERVE_EXPECT="" \
    PORT=8000
EXPOSE 8000

# verify exits 0 pass, 1 fail, 2 usage error; Docker wants 0 or 1, hence `|| exit 1`. The start period
# covers loading the model (and converting a GGUF once).
HEALTHCHECK --interval=60s --timeout=120s --start-period=300s --retries=3 \
    CMD loraserve verify --url "http://127.0.0.1:${PORT}" --model "${LORASERVE_ADAPTER}" --base "${LORASERVE_BASE}" --expect "${LORASERVE_EXPECT}" --max-tokens 16 || exit 1

CMD loraserve serve "$LORASERVE_MODEL" --served-model-name "$LORASERVE_BASE" --enable-lora \
    --lora-modules "$LORASERVE_ADAPTER=$LORASERVE_ADAPTER_PATH" --host 0.0.0.0 --port "$PORT"
