"""The `loraserve` command: vLLM's flag names map onto EngineConfig, every flag is documented, bad
LoRA flags are refused with a message, and `serve` really starts a server."""

import argparse
import json
import os
import subprocess
import sys

import httpx
import pytest

from loraserve.cli import build_parser, engine_config, main, serving_threads
from loraserve.config import EngineConfig, LoRAConfig
from server_fixtures import Launch, build_tiny_llama


def serve_config(*argv: str) -> EngineConfig:
    return engine_config(build_parser().parse_args(["serve", *argv]))


def serve_parser() -> argparse.ArgumentParser:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["serve"]


def test_defaults_are_the_engine_configs_defaults():
    assert serve_config("some/model") == EngineConfig(model="some/model")


def test_vllm_flags_map_onto_engine_config():
    config = serve_config(
        "m.gguf", "--served-model-name", "smol", "--max-model-len", "2048", "--dtype", "float32",
        "--device", "cpu", "--max-num-seqs", "8", "--max-num-batched-tokens", "256", "--seed", "3",
        "--block-size", "32", "--kv-cache-memory-gb", "0.5", "--num-gpu-blocks-override", "100",
        "--trust-remote-code", "--enable-lora", "--lora-modules", "a=/ad/a",
        '{"name": "b", "path": "/ad/b", "base_model_name": "smol"}', "--max-lora-rank", "64",
        "--max-loras", "4", "--max-cpu-loras", "16")
    assert config == EngineConfig(
        model="m.gguf", served_model_name="smol", max_model_len=2048, dtype="float32", device="cpu",
        max_num_seqs=8, max_num_batched_tokens=256, seed=3, block_size=32, kv_cache_memory_gb=0.5,
        num_kv_blocks=100, trust_remote_code=True,
        lora=LoRAConfig(enable_lora=True, lora_modules={"a": "/ad/a", "b": "/ad/b"}, max_lora_rank=64,
                        max_loras=4, max_cpu_loras=16))


def test_no_prepack_weights_maps_onto_engine_config():
    assert serve_config("m", "--no-prepack-weights") == EngineConfig(model="m", prepack_weights=False)


def test_no_cpu_kernels_maps_onto_engine_config():
    assert serve_config("m", "--no-cpu-kernels") == EngineConfig(model="m", cpu_kernels=False)


def test_no_helper_thread_maps_onto_engine_config():
    assert serve_config("m", "--no-helper-thread") == EngineConfig(model="m", helper_thread=False)
    assert serve_config("m").helper_thread


def test_no_lean_forward_maps_onto_engine_config():
    assert serve_config("m", "--no-lean-forward") == EngineConfig(model="m", lean_forward=False)
    assert serve_config("m").lean_forward


def test_serving_threads_leave_a_core_for_the_http_side(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert serving_threads(None) == 3
    assert serving_threads(2) == 2                      # --num-threads wins
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert serving_threads(None) == 1                   # never zero
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert serving_threads(None) is None                # the user's OMP_NUM_THREADS stands


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in serve_parser()._actions:
        assert action.help, f"{action.dest} has no help"
        for flag in action.option_strings:
            assert flag in text
    for flag in ("--served-model-name", "--max-model-len", "--dtype", "--host", "--port", "--api-key",
                 "--max-num-seqs", "--max-num-batched-tokens", "--seed", "--enable-lora", "--lora-modules",
                 "--max-lora-rank", "--max-loras", "--max-cpu-loras", "--device", "--trust-remote-code"):
        assert flag in text


@pytest.mark.parametrize("argv,message", [
    (["--enable-lora", "--lora-modules", "just-a-name"], "is not NAME=PATH"),
    (["--enable-lora", "--lora-modules", "=path"], "is not NAME=PATH"),
    (["--enable-lora", "--lora-modules", '{"name": "a"'], "not valid JSON"),
    (["--enable-lora", "--lora-modules", '{"name": "a", "path": "/p", "rank": 8}'], "unknown keys: rank"),
    (["--enable-lora", "--lora-modules", '{"name": "a"}'], "needs string 'name' and 'path'"),
    (["--enable-lora", "--lora-modules", "a=/x", "a=/y"], "names 'a' twice"),
    (["--lora-modules", "a=/x"], "needs --enable-lora"),
    (["--enable-lora", "--lora-modules", json.dumps({"name": "a", "path": "/p", "base_model_name": "other"})],
     "declares base_model_name 'other'"),
])
def test_bad_lora_flags_are_refused_with_a_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "some/model", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_serve_starts_a_server(tmp_path_factory):
    model_dir = build_tiny_llama(tmp_path_factory.getbasetemp() / "tiny-llama")
    with Launch("loraserve.cli", "serve", str(model_dir), "--served-model-name", "cli-tiny", "--dtype", "float32",
                "--device", "cpu", "--max-model-len", "128", "--num-kv-blocks", "32", "--api-key", "k",
                "--num-threads", "1") as server:
        models = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [("cli-tiny", 128)]
        res = httpx.post(server.url + "/v1/completions", headers={"Authorization": "Bearer k"},
                         json={"model": "cli-tiny", "prompt": "hi", "max_tokens": 3, "ignore_eos": True})
        assert res.json()["usage"]["completion_tokens"] == 3
        assert "engine loop threads: 1 of" in server.output()


def test_serve_refuses_a_missing_model_path_cleanly(tmp_path):
    res = subprocess.run([sys.executable, "-m", "loraserve.cli", "serve", str(tmp_path / "nothing")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "does not exist" in res.stderr and "Traceback" not in res.stderr
