"""`python -m loraserve.entrypoints.openai.api_server --model BASE ...`: vLLM's OpenAI server entry point."""

from loraserve.entrypoints import run_serve

if __name__ == "__main__":
    run_serve("python -m loraserve.entrypoints.openai.api_server")
