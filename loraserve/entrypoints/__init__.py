"""vLLM-style module entry points: `python -m loraserve.entrypoints.openai.api_server` and
`python -m loraserve.entrypoints.api_server` take the same flags as `loraserve serve`."""

import argparse

from loraserve.cli import SERVE_DESCRIPTION, add_serve_args, run


def run_serve(prog: str, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=SERVE_DESCRIPTION)
    add_serve_args(parser)
    run(parser, argv)
