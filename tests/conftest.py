"""Fixtures shared by the HTTP tests: a tiny random Llama with SmolLM2's real tokenizer, served by a
real engine on loopback (modules that need another setup define their own `model_dir` / `server`)."""

import pytest

from loraserve.engine.async_engine import AsyncEngine
from loraserve.model import kernels
from server_fixtures import ServerThread, build_tiny_llama, tiny_engine_config


@pytest.fixture(scope="session", autouse=True)
def built_cpu_kernels():
    """Build the C++ kernels once, before any test starts a server process: those then load the cached
    builds (~0.1 s) instead of compiling (~20 s each) inside their start-up timeouts."""
    kernels.paged_attention()
    kernels.multi_lora()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.getbasetemp() / "tiny-llama")


@pytest.fixture(scope="module")
def server(model_dir):
    with ServerThread(AsyncEngine(tiny_engine_config(model_dir))) as s:
        yield s
