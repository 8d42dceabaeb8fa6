"""vLLM-style module entry points: `python -m loraserve.entrypoints.openai.api_server` and
`python -m loraserve.entrypoints.api_server` take the same flags as `loraserve serve`."""

import argparse
import logging

from loraserve.cli import SERVE_DESCRIPTION, LoRAModulesError, add_serve_args


def run_serve(prog: str, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=SERVE_DESCRIPTION)
    add_serve_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    try:
        args.func(args)
    except LoRAModulesError as err:
        parser.error(str(err))
