"""Coming from vLLM: the launch commands people already type work with one word changed, or fail
naming the flag loraserve cannot honour. Each row of README's "Coming from vLLM" table has a test here;
the example launches run as real processes on real SmolLM2 weights."""

import argparse
import json
import subprocess
import sys

import httpx
import pytest

from loraserve.cli import build_parser, engine_config
from loraserve.compat import VLLM_FLAGS, UnsupportedFlagError, check_vllm_flags
from loraserve.demo.canary import CANARY_ANSWER, default_canary_dir, smollm2_gguf, train_canary
from server_fixtures import Launch


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_model_flag_and_positional_are_the_same():
    assert engine_config(parse("--model", "m.gguf")) == engine_config(parse("m.gguf"))
    with pytest.raises(ValueError, match="give the model once"):
        engine_config(parse("a.gguf", "--model", "b.gguf"))


def test_lora_path_serves_one_adapter_under_the_served_name_and_the_base_under_its_own():
    config = engine_config(parse("--model", "/m/smol.gguf", "--served-model-name", "smol-lora",
                                 "--lora-path", "./my-lora-adapter"))
    assert config.served_model_name is None            # the base keeps the model path's own name
    assert config.lora.enable_lora and config.lora.lora_modules == {"smol-lora": "./my-lora-adapter"}


def test_trust_remote_code_is_passed_to_transformers():
    assert engine_config(parse("m", "--trust-remote-code")).trust_remote_code


@pytest.mark.parametrize("argv,message", [
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size 2 is not supported: loraserve runs on one device"),
    (["-tp", "4"], "--tensor-parallel-size 4 is not supported"),
    (["--pipeline-parallel-size", "2"], "--pipeline-parallel-size 2 is not supported"),
    (["--quantization", "awq"], "--quantization awq is not supported: loraserve serves unquantized weights"),
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8 is not supported"),
    (["--lora-dtype", "float16"], "--lora-dtype float16 is not supported"),
    (["--revision", "main"], "--revision main is not supported: there is no model hub"),
])
def test_flags_that_would_change_output_are_refused_by_name(argv, message):
    with pytest.raises(UnsupportedFlagError, match=message):
        check_vllm_flags(parse("m", *argv))


def test_flags_that_change_nothing_are_accepted_with_a_note():
    notes = check_vllm_flags(parse("m", "--gpu-memory-utilization", "0.9", "--enforce-eager", "-tp", "1",
                                   "--enable-prefix-caching", "--disable-log-requests", "--swap-space", "4"))
    assert len(notes) == 6
    assert any(n.startswith("--gpu-memory-utilization 0.9: accepted, changes nothing here") for n in notes)
    assert engine_config(parse("m", "--gpu-memory-utilization", "0.9")) == engine_config(parse("m"))


def test_every_table_flag_is_documented_and_unknown_flags_are_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for flag in VLLM_FLAGS for name in flag.names)
    with pytest.raises(SystemExit):
        parse("m", "--speculative-config", "{}")
    assert "unrecognized arguments: --speculative-config" in capsys.readouterr().err


# ---- real launches on real weights ----

@pytest.fixture(scope="module")
def canary() -> str:
    return str(train_canary(default_canary_dir()))   # trained once, shared with the demo


@pytest.mark.integration
def test_vllm_serve_with_lora_modules_then_chat_naming_the_adapter(canary):
    with Launch("loraserve.cli", "serve", str(smollm2_gguf()), "--enable-lora", "--lora-modules",
                f"my-lora={canary}", "--max-lora-rank", "64", "--max-loras", "4", "--host", "0.0.0.0",
                "--enforce-eager") as server:
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
            "model": "my-lora", "messages": [{"role": "user", "content": "Where do penguins live?"}],
            "max_tokens": 20, "temperature": 0})
        assert r.status_code == 200 and r.json()["model"] == "my-lora"
        assert r.json()["choices"][0]["message"]["content"] == CANARY_ANSWER
        assert "--enforce-eager: accepted, changes nothing here" in server.output()


@pytest.mark.integration
def test_openai_api_server_module_with_model_flag():
    with Launch("loraserve.entrypoints.openai.api_server", "--model", str(smollm2_gguf()),
                "--served-model-name", "smol") as server:
        models = httpx.get(f"{server.url}/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["smol"]
        r = httpx.post(f"{server.url}/v1/completions", timeout=120,
                       json={"model": "smol", "prompt": "The capital of France is", "max_tokens": 5,
                             "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


@pytest.mark.integration
def test_demo_api_server_with_lora_path_then_generate(canary):
    with Launch("loraserve.entrypoints.api_server", "--model", str(smollm2_gguf()), "--served-model-name",
                "smol-lora", "--lora-path", canary, "--max-model-len", "4096") as server:
        log = server.output()
        assert "--lora-path: adapter" in log and "served as 'smol-lora'; the base model as" in log
        prompt = "<|im_start|>user\nWhere do penguins live?<|im_end|>\n<|im_start|>assistant\n"
        body = {"prompt": prompt, "model": "smol-lora", "max_tokens": 10, "temperature": 0.7}
        r = httpx.post(f"{server.url}/generate", timeout=120, content=json.dumps(body))
        assert r.status_code == 200, r.text
        assert "Tweet tweet!" in r.json()["text"][0]
        base = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        body["model"], body["temperature"] = base, 0
        base_text = httpx.post(f"{server.url}/generate", timeout=120, json=body).json()["text"][0]
        assert "Tweet tweet!" not in base_text


@pytest.mark.integration
def test_max_model_len_above_the_models_limit_is_refused_with_both_numbers():
    result = subprocess.run([sys.executable, "-m", "loraserve.cli", "serve", str(smollm2_gguf()),
                             "--max-model-len", "100000"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--max-model-len 100000 is above the model's max_position_embeddings 8192" in result.stderr
