"""`loraserve verify` against a live loraserve over real HTTP (uvicorn on loopback, a real engine, a
tiny random Llama with SmolLM2's tokenizer): it passes for a working adapter and fails, with the
reason, for the base posing as the adapter, an unlisted name, a wrong key and a server that is down.
The console command runs as a subprocess, so the exit codes are the ones a healthcheck sees."""

import json
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_fixtures import make_adapter
from loraserve.cli import build_parser
from loraserve.config import LoRAConfig
from loraserve.engine.async_engine import AsyncEngine
from server_fixtures import ServerThread, build_tiny_llama, tiny_engine_config

ROOT = Path(__file__).resolve().parents[1]
BASE = "tiny-llama"
KEY = "sk-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = build_tiny_llama(tmp_path_factory.getbasetemp() / "tiny-llama")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapter = make_adapter(base, tmp_path_factory.mktemp("verify") / "tuned")
    config = tiny_engine_config(model_dir, lora=LoRAConfig(enable_lora=True, lora_modules={"tuned": str(adapter)}))
    with ServerThread(AsyncEngine(config), api_key=KEY) as s:
        yield s


def verify(*args: str) -> tuple[int, dict]:
    """`loraserve verify ... --json` as a separate process."""
    proc = subprocess.run([sys.executable, "-m", "loraserve.cli", "verify", *args, "--json", "--max-tokens", "8"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {"stderr": proc.stderr}


def test_working_adapter_passes(server):
    code, result = verify("--url", server.url, "--model", "tuned", "--base", BASE, "--api-key", KEY)
    assert code == 0 and result["ok"], result
    assert len(result["answers"]) == 4 and any(a["adapter"] != a["base"] for a in result["answers"])


def test_expect_text_must_be_in_every_adapter_answer(server):
    code, result = verify("--url", server.url, "--model", "tuned", "--base", BASE, "--api-key", KEY,
                          "--prompt", "Hello", "--expect", "Tweet tweet! I am the loraserve canary.")
    assert code == 1 and "lacks 'Tweet tweet" in result["reason"]
    seen = result["answers"][0]["adapter"]
    code, result = verify("--url", server.url, "--model", "tuned", "--base", BASE, "--api-key", KEY,
                          "--prompt", "Hello", "--expect", seen)
    assert code == 0, result


def test_base_posing_as_the_adapter_fails(server):
    code, result = verify("--url", server.url, "--model", BASE, "--base", BASE, "--api-key", KEY, "--api",
                          "completions")
    assert code == 1 and "answers exactly like the base" in result["reason"]


def test_unlisted_adapter_fails(server):
    code, result = verify("--url", server.url, "--model", "tuned-v2", "--base", BASE, "--api-key", KEY)
    assert code == 1 and result["reason"].startswith("not listed by /v1/models: 'tuned-v2'")
    assert "tuned" in result["reason"] and result["answers"] == []


def test_wrong_key_says_so(server):
    code, result = verify("--url", server.url, "--model", "tuned", "--base", BASE, "--api-key", "wrong")
    assert code == 1 and "refused the API key (401)" in result["reason"]


def test_server_down_fails_clearly():
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, result = verify("--url", f"http://127.0.0.1:{port}", "--model", "tuned", "--base", BASE)
    assert code == 1 and result["reason"].startswith("server down: cannot reach")


def test_usage_error_exits_2():
    code, result = verify("--url", "http://127.0.0.1:1", "--model", "tuned")   # no --base
    assert code == 2 and "--base" in result["stderr"]


def test_dockerfile_healthcheck_runs_verify_with_real_flags():
    """The Dockerfile's HEALTHCHECK must be a `loraserve verify` command this parser accepts."""
    text = (ROOT / "Dockerfile").read_text()
    match = re.search(r"^HEALTHCHECK .*?CMD (.+?)$", text.replace("\\\n", " "), re.M)
    assert match, "no HEALTHCHECK ... CMD line"
    command = match.group(1).split("||")[0]        # `|| exit 1` maps verify's usage error 2 to Docker's 1
    argv = shlex.split(re.sub(r"\$\{?(\w+)\}?", "X", command))   # env vars expand at run time
    assert argv[:2] == ["loraserve", "verify"]
    args = build_parser().parse_args(argv[1:])
    assert args.url and args.model and args.base and args.expect
