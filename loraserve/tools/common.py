"""What every tool shares and what costs nothing to import: exit codes, the probe prompts, usage
errors and printing a result as text or JSON. (Model loading lives in `oracle`, so `verify` stays
free of torch.)"""

import json
import sys
from pathlib import Path

# Prompts that exercise ordinary chat, facts and code; long enough to pass through every layer type
# (sliding-window layers included) yet cheap on CPU.
PROBE_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain why the sky is blue in one sentence.",
)

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Arguments that cannot be acted on (exit code 2); the message says which and why."""


def emit(result: dict, as_json: bool, text: str) -> None:
    """Print the result for a person, or as one JSON document for a script."""
    if as_json:
        json.dump(result, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")


def adapter_dir(path: str) -> Path:
    """The adapter directory, or a usage error naming what is missing."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"adapter path {path!r} is not a directory")
    return p
