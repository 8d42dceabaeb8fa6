"""The runtime-LoRA flags of `loraserve serve`: --allow-runtime-lora / vLLM's env variable open the load
endpoint of a real `serve` process, --lora-root repeats, and host memory smaller than the slots is refused."""

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_fixtures import make_adapter
from loraserve.cli import build_parser, main
from loraserve.server.lora_admin import RUNTIME_LORA_ENV, runtime_lora_from_env
from server_fixtures import Launch, build_tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_runtime_lora_flags_parse_and_are_off_by_default(monkeypatch):
    args = build_parser().parse_args(["serve", "m", "--allow-runtime-lora", "--lora-root", "/a", "--lora-root", "/b"])
    assert args.allow_runtime_lora and args.lora_root == ["/a", "/b"]
    args = build_parser().parse_args(["serve", "m"])
    assert not args.allow_runtime_lora and args.lora_root == []
    monkeypatch.delenv(RUNTIME_LORA_ENV, raising=False)
    assert not runtime_lora_from_env()
    for value, on in (("true", True), ("True ", True), ("1", True), ("false", False), ("0", False), ("yes", False)):
        monkeypatch.setenv(RUNTIME_LORA_ENV, value)
        assert runtime_lora_from_env() is on, value


def test_host_memory_smaller_than_the_slots_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "m", "--enable-lora", "--max-loras", "4", "--max-cpu-loras", "2"])
    assert exit_info.value.code == 2
    assert "--max-cpu-loras 2 is below --max-loras 4" in capsys.readouterr().err


def test_vllm_env_opens_the_load_endpoint_of_a_served_process(tmp_path_factory):
    model_dir = build_tiny_llama(tmp_path_factory.getbasetemp() / "tiny-llama")
    root = tmp_path_factory.mktemp("cli-loras")
    make_adapter(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), root / "a", seed=1)
    with Launch("loraserve.cli", "serve", str(model_dir), "--dtype", "float32", "--device", "cpu",
                "--max-model-len", "128", "--num-kv-blocks", "32", "--enable-lora", "--lora-root", str(root),
                env={RUNTIME_LORA_ENV: "true"}) as server:
        r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "a"})
        assert r.status_code == 200, r.text
        assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]][1:] == ["a"]
