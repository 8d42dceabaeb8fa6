#!/usr/bin/env bash
# README command 2: set up, lint, and run the whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check loraserve tests bench      # lint first (pyproject.toml [tool.ruff]): takes a second
python -m pytest -q "$@"
