"""`python -m loraserve.entrypoints.api_server --model BASE [--lora-path DIR] ...`: vLLM's demo API server
entry point. The same server as `loraserve serve`; its `POST /generate` route is the one such launch
commands are written for."""

from loraserve.entrypoints import run_serve

if __name__ == "__main__":
    run_serve("python -m loraserve.entrypoints.api_server")
