"""Runtime adapter management over real HTTP: vLLM's load / unload endpoints, confined to --lora-root,
behind the API key, refused unless switched on; a loaded adapter answers exactly as PeftModel does;
an unload in the middle of a stream lets the stream finish with the same tokens."""

import copy
import json
import os

import httpx
import pytest
import torch
from peft import PeftModel
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from lora_fixtures import make_adapter
from loraserve.config import LoRAConfig
from loraserve.engine.async_engine import AsyncEngine
from server_fixtures import ServerThread, build_tiny_llama, tiny_engine_config, wait_until

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

KEY = "secret-key"
BASE = "tiny-llama"
PROMPT = [1, 504, 3267, 314, 253, 3153, 30, 2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.getbasetemp() / "tiny-llama")


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, hf_model):
    """An allowed root with adapters and links, and an adapter outside it."""
    root, outside = tmp_path_factory.mktemp("loras"), tmp_path_factory.mktemp("elsewhere")
    make_adapter(hf_model, root / "good", seed=1, r=4, target_modules="all-linear")
    make_adapter(hf_model, root / "other", seed=2, r=2, target_modules=["q_proj", "v_proj"])
    make_adapter(hf_model, root / "untrained", randomize_weights=False)
    make_adapter(hf_model, outside / "adapter", seed=3)
    os.symlink(outside / "adapter", root / "escape")
    os.symlink(root / "other", root / "alias")
    return root, outside


@pytest.fixture(scope="module")
def server(model_dir, dirs):
    engine = AsyncEngine(tiny_engine_config(model_dir, lora=LoRAConfig(enable_lora=True, max_loras=2)))
    with ServerThread(engine, api_key=KEY, allow_runtime_lora=True, lora_roots=[str(dirs[0])]) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


def load(http: httpx.Client, name: str, path: str) -> httpx.Response:
    return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})


def unload(http: httpx.Client, name: str) -> httpx.Response:
    return http.post("/v1/unload_lora_adapter", json={"lora_name": name})


def complete(http: httpx.Client, model: str, max_tokens: int = 8) -> httpx.Response:
    return http.post("/v1/completions", json={
        "model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "logprobs": 0, "return_tokens_as_token_ids": True})


def tokens_and_logprobs(response: httpx.Response) -> tuple[list[int], list[float]]:
    assert response.status_code == 200, response.text
    lp = response.json()["choices"][0]["logprobs"]
    return [int(t.removeprefix("token_id:")) for t in lp["tokens"]], lp["token_logprobs"]


def peft_greedy(model: torch.nn.Module, n: int) -> tuple[list[int], list[float]]:
    ids, logprobs = list(PROMPT), []
    with torch.no_grad():
        for _ in range(n):
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
            ids.append(int(lp.argmax()))
            logprobs.append(lp.max().item())
    return ids[len(PROMPT):], logprobs


def error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == code, body
    return body["message"]


def metric(url: str, name: str, labels: dict) -> float | None:
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def test_load_serves_exactly_like_peft_then_unload_gives_404(server, http, dirs, hf_model):
    root = dirs[0]
    r = load(http, "good", "good")
    assert r.status_code == 200, r.text
    assert r.json()["created"] is True and r.json()["adapter"]["ranks"] == [4]
    assert r.json()["adapter"]["modules_by_type"]["q_proj"] == 2
    cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
    assert cards["good"]["root"] == os.path.realpath(root / "good") and cards["good"]["parent"] == BASE

    tokens, logprobs = tokens_and_logprobs(complete(http, "good"))
    peft = PeftModel.from_pretrained(copy.deepcopy(hf_model), str(root / "good")).eval()
    want_tokens, want_logprobs = peft_greedy(peft, 8)
    assert tokens == want_tokens
    assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs)) < 1e-4
    assert tokens_and_logprobs(complete(http, BASE))[0] == peft_greedy(hf_model, 8)[0]

    status = http.get("/v1/adapters/good").json()
    assert status["tier"] == "device" and status["ranks"] == [4] and status["requests"] == 0
    assert status["next_token_kl"] > 0          # a runtime load's effect is measured when first asked
    assert [a["name"] for a in http.get("/v1/adapters").json()["data"]] == ["good"]

    r = unload(http, "good")
    assert r.status_code == 200 and r.json()["requests_in_flight"] == 0
    message = error(complete(http, "good"), 404, "model_not_found")
    assert "'good' does not exist" in message and f"Served models: {BASE}" in message
    error(http.get("/v1/adapters/good"), 404, "adapter_not_found")
    assert "no adapter named 'good'" in error(unload(http, "good"), 404, "adapter_not_found")


def test_same_path_is_idempotent_other_path_or_base_name_conflict(http, dirs):
    root = dirs[0]
    assert load(http, "dup", "other").json()["created"] is True
    again = load(http, "dup", str(root / "other"))            # absolute path inside the root, same directory
    assert again.status_code == 200 and again.json()["created"] is False
    assert load(http, "dup", "alias").json()["created"] is False   # a symlink inside the root to it
    assert "already loaded" in error(load(http, "dup", "good"), 409, "adapter_name_conflict")
    assert "base model's name" in error(load(http, BASE, "good"), 409, "adapter_name_conflict")
    assert unload(http, "dup").status_code == 200


def test_bad_adapter_is_refused_by_name_and_the_server_keeps_serving(server, http):
    failures = metric(server.url, "loraserve:lora_loads_total", {"kind": "load", "result": "failure"}) or 0
    assert "this adapter changes nothing" in error(load(http, "zero", "untrained"), 400, "invalid_adapter")
    assert "no adapter_config.json" in error(load(http, "missing", "nope"), 400, "invalid_adapter")
    assert metric(server.url, "loraserve:lora_loads_total", {"kind": "load", "result": "failure"}) == failures + 2
    assert [c["id"] for c in http.get("/v1/models").json()["data"]] == [BASE]
    assert complete(http, BASE).status_code == 200


@pytest.mark.parametrize("path", ["../elsewhere/adapter", "good/../../elsewhere/adapter", "OUTSIDE", "escape"])
def test_paths_leaving_the_roots_are_forbidden(http, dirs, path):
    path = str(dirs[1] / "adapter") if path == "OUTSIDE" else path
    message = error(load(http, "sneaky", path), 403, "lora_path_forbidden")
    assert repr(path) in message and ("'..'" in message or "outside the allowed adapter directories" in message)
    assert "sneaky" not in [c["id"] for c in http.get("/v1/models").json()["data"]]


def test_endpoints_need_the_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "good"},
                       headers=headers)
        assert r.status_code == 401, r.text
        assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "x"},
                          headers=headers).status_code == 401
        assert httpx.get(server.url + "/v1/adapters", headers=headers).status_code == 401


def test_runtime_loading_is_refused_unless_switched_on(model_dir, dirs):
    engine = AsyncEngine(tiny_engine_config(model_dir, lora=LoRAConfig(enable_lora=True)))
    with ServerThread(engine, lora_roots=[str(dirs[0])]) as s:
        r = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "good"})
        assert "--allow-runtime-lora" in error(r, 403, "runtime_lora_disabled")
        r = httpx.post(s.url + "/v1/unload_lora_adapter", json={"lora_name": "x"})
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true" in error(r, 403, "runtime_lora_disabled")
        assert httpx.get(s.url + "/v1/adapters").json() == {"object": "list", "data": []}
    engine = AsyncEngine(tiny_engine_config(model_dir))
    with ServerThread(engine, allow_runtime_lora=True, lora_roots=[str(dirs[0])]) as s:
        r = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "good"})
        assert "start it with --enable-lora" in error(r, 403, "runtime_lora_disabled")
        assert "--enable-lora" in error(httpx.get(s.url + "/v1/adapters/x"), 404, "adapter_not_found")
        assert httpx.get(s.url + "/v1/adapters").json() == {"object": "list", "data": []}


def test_unload_during_a_stream_lets_it_finish_with_the_same_tokens(server, http):
    assert load(http, "streamer", "good").status_code == 200
    n = 200
    want, _ = tokens_and_logprobs(complete(http, "streamer", n))
    body = {"model": "streamer", "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0, "return_tokens_as_token_ids": True}
    got, unloaded = [], None
    with http.stream("POST", "/v1/completions", json=body) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data: {"):
                continue
            tokens = json.loads(line[6:])["choices"][0]["logprobs"]["tokens"]
            got += [int(t.removeprefix("token_id:")) for t in tokens]
            if len(got) == 3:           # mid-stream: the adapter is running, then it is unloaded
                assert metric(server.url, "vllm:lora_requests_info",
                              {"max_lora": "2", "running_lora_adapters": "streamer"}) is not None
                unloaded = unload(http, "streamer").json()
                assert unloaded["requests_in_flight"] == 1
                error(complete(http, "streamer"), 404, "model_not_found")
    assert unloaded is not None and got == want
    assert wait_until(lambda: http.get("/v1/adapters").json()["data"] == [])
    assert metric(server.url, "loraserve:lora_requests_total",
                  {"lora_name": "streamer", "finished_reason": "length"}) == 2
