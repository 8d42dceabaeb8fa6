"""The OpenAI-compatible API over real HTTP: the official `openai` client (httpx for raw bodies)
against uvicorn on loopback, a real AsyncEngine, a tiny random Llama with SmolLM2's tokenizer."""

import asyncio
import copy

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_fixtures import make_adapter
from loraserve import __version__
from loraserve.config import LoRAConfig
from loraserve.engine.async_engine import AsyncEngine
from server_fixtures import MAX_MODEL_LEN, ServerThread, tiny_engine_config, wait_until

MODEL = "tiny-llama"
AS_IDS = {"return_tokens_as_token_ids": True}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def token_ids(logprobs_tokens: list[str]) -> list[int]:
    """Token ids from logprobs tokens sent with vLLM's return_tokens_as_token_ids."""
    return [int(t.removeprefix("token_id:")) for t in logprobs_tokens]


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy continuation, cut after the first EOS as the server stops there."""
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=model.config.eos_token_id)
    new = out[0, len(prompt_ids):].tolist()
    eos = model.config.eos_token_id
    return new[:new.index(eos) + 1] if eos in new else new


def metric(url: str, name: str, labels: dict | None = None) -> float:
    text = httpx.get(url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return sample.value
    return 0.0


def test_models_lists_the_base_in_vllms_shape(client, model_dir):
    (card,) = client.models.list().data
    assert card.id == MODEL and card.object == "model" and card.owned_by == "loraserve"
    assert card.root == str(model_dir) and card.parent is None and card.max_model_len == MAX_MODEL_LEN


def test_concurrent_greedy_completions_equal_transformers_generate(server, tokenizer, hf_model):
    """Prompts of different lengths (some longer than the 64-token prefill budget, so chunked) in
    flight at once; each answer equals transformers' greedy generate token for token."""
    texts = ["Hello", "The capital of France is", " ".join(["lorem ipsum dolor"] * 30), "1, 2, 3,"]
    prompts = [tokenizer.encode(t) for t in texts] + [list(range(100, 100 + k)) for k in (7, 90)]
    lengths = [12, 20, 9, 16, 14, 11]

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as aclient:
            return await asyncio.gather(*[
                aclient.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0, logprobs=0,
                                           extra_body=AS_IDS)
                for p, n in zip(prompts, lengths)])

    results = asyncio.run(run_all())
    for prompt, n, res in zip(prompts, lengths, results):
        got = token_ids(res.choices[0].logprobs.tokens)
        assert got == hf_greedy(hf_model, prompt, n)
        assert res.choices[0].text == tokenizer.decode(got, skip_special_tokens=True)
        assert res.usage.prompt_tokens == len(prompt) and res.usage.completion_tokens == len(got)


def collect_completion_stream(stream) -> tuple[str, list[int], str, object]:
    text, ids, finish, usage = "", [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.text
            ids += token_ids(choice.logprobs.tokens) if choice.logprobs else []
            finish = choice.finish_reason or finish
    return text, ids, finish, usage


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 11, "top_p": 0.9}])
def test_completion_stream_equals_non_stream(client, sampling):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=24, logprobs=1, extra_body=AS_IDS, **sampling)
    full = client.completions.create(**kwargs)
    stream = client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    text, ids, finish, usage = collect_completion_stream(stream)
    choice = full.choices[0]
    assert text == choice.text and ids == token_ids(choice.logprobs.tokens)
    assert finish == choice.finish_reason
    assert usage == full.usage


def test_chat_stream_equals_non_stream_and_counts_template_tokens(client, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=20, temperature=0, logprobs=True, top_logprobs=2,
                  extra_body=AS_IDS)
    full = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    role, text, ids, finish, usage = None, "", [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            role = choice.delta.role or role
            text += choice.delta.content or ""
            ids += token_ids([c.token for c in choice.logprobs.content]) if choice.logprobs else []
            finish = choice.finish_reason or finish
    choice = full.choices[0]
    assert role == "assistant" and choice.message.role == "assistant"
    assert text == choice.message.content and ids == token_ids([c.token for c in choice.logprobs.content])
    assert finish == choice.finish_reason and usage == full.usage
    template_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
    assert full.usage.prompt_tokens == len(template_ids)
    assert full.usage.completion_tokens == len(ids)


def test_usage_counts_every_prompt_once_and_every_generated_token(client, tokenizer):
    prompts = ["a b c d", "Hello world, how are you?"]
    res = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=5, temperature=0.8,
                                    extra_body={"ignore_eos": True})
    assert len(res.choices) == 4 and sorted(c.index for c in res.choices) == [0, 1, 2, 3]
    assert res.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
    assert res.usage.completion_tokens == 4 * 5
    assert res.usage.total_tokens == res.usage.prompt_tokens + 20
    assert all(c.finish_reason == "length" for c in res.choices)


def test_n_choices_are_seed_plus_index(client):
    kwargs = dict(model=MODEL, prompt="Tell me a story", max_tokens=10, temperature=1.0)
    many = client.completions.create(n=3, seed=5, **kwargs)
    singles = [client.completions.create(seed=5 + i, **kwargs).choices[0].text for i in range(3)]
    assert [c.text for c in sorted(many.choices, key=lambda c: c.index)] == singles
    assert len(set(singles)) == 3


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text(client, stream):
    kwargs = dict(model=MODEL, prompt="The weather today", max_tokens=30, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.index(stop)]
    if stream:
        text, _, finish, _ = collect_completion_stream(client.completions.create(stop=[stop], stream=True, **kwargs))
    else:
        choice = client.completions.create(stop=stop, **kwargs).choices[0]
        text, finish = choice.text, choice.finish_reason
    assert (text, finish) == (expected, "stop")


def test_completion_logprobs_shape(client):
    res = client.completions.create(model=MODEL, prompt="Hi", max_tokens=8, temperature=0, logprobs=3)
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == res.usage.completion_tokens
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and chosen <= 0
        assert top[token] == pytest.approx(max(top.values()))      # greedy picks the most likely token
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_chat_logprobs_shape(client):
    res = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = res.choices[0].logprobs.content
    assert len(content) == res.usage.completion_tokens
    for entry in content:
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def test_max_completion_tokens_wins_over_max_tokens(client):
    res = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=9, max_completion_tokens=4, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert res.usage.completion_tokens == 4 and res.choices[0].finish_reason == "length"


def test_generate_returns_prompt_plus_completion_and_usage(server, client):
    body = {"prompt": "Hello", "model": MODEL, "max_tokens": 6, "temperature": 0}
    res = httpx.post(server.url + "/generate", json=body)
    assert res.status_code == 200
    completion = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0)
    assert res.json() == {"text": ["Hello" + completion.choices[0].text], "usage": completion.usage.model_dump(
        include={"prompt_tokens", "completion_tokens", "total_tokens"})}


def test_metrics_count_tokens_under_vllm_names(server, client):
    labels = {"model_name": MODEL}
    before = {name: metric(server.url, name, labels) for name in (
        "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:e2e_request_latency_seconds_count",
        "vllm:time_to_first_token_seconds_count")}
    res = client.completions.create(model=MODEL, prompt="count me", max_tokens=7, temperature=0,
                                    extra_body={"ignore_eos": True})
    after = {name: metric(server.url, name, labels) for name in before}
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == res.usage.prompt_tokens
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 7
    assert after["vllm:e2e_request_latency_seconds_count"] == before["vllm:e2e_request_latency_seconds_count"] + 1
    assert after["vllm:time_to_first_token_seconds_count"] == before["vllm:time_to_first_token_seconds_count"] + 1
    assert metric(server.url, "vllm:num_requests_running", labels) == 0
    assert metric(server.url, "vllm:num_requests_waiting", labels) == 0
    assert metric(server.url, "vllm:kv_cache_usage_perc", labels) == 0


def test_health_and_version(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json() == {"version": __version__}


def test_health_is_503_once_the_engine_loop_is_gone(model_dir):
    engine = AsyncEngine(tiny_engine_config(model_dir))
    with ServerThread(engine) as s:
        assert httpx.get(s.url + "/health").status_code == 200
        asyncio.run(engine.shutdown())
        assert httpx.get(s.url + "/health").status_code == 503


def all_blocks_free(engine) -> bool:
    stats = engine.stats()
    return stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_running"] == stats["num_waiting"] == 0


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "Never ending", "n": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Never ending"}], "n": 2}),
])
def test_client_disconnect_mid_stream_frees_every_kv_block(server, path, body):
    engine = server.engine
    aborted = metric(server.url, "vllm:request_success_total", {"finished_reason": "abort"})
    body = {**body, "model": MODEL, "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", server.url + path, json=body) as res:
        assert res.status_code == 200
        events = (line for line in res.iter_lines() if line.startswith("data: "))
        for _ in range(4):
            next(events)
        stats = engine.stats()
        assert stats["num_running"] == body["n"] and stats["kv_blocks_free"] < stats["kv_blocks_total"]
    assert wait_until(lambda: all_blocks_free(engine)), engine.stats()
    # The requests were aborted, not run to their 400 tokens.
    assert metric(server.url, "vllm:request_success_total", {"finished_reason": "abort"}) == aborted + body["n"]


def test_client_disconnect_before_a_non_streaming_answer_frees_every_kv_block(server):
    aborted = metric(server.url, "vllm:request_success_total", {"finished_reason": "abort"})
    body = {"model": MODEL, "prompt": "Never ending", "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    # The client stops reading after 50 ms; 400 tokens take 400 steps of ~1 ms here, so the answer is not ready.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(10.0, read=0.05))
    assert wait_until(lambda: all_blocks_free(server.engine)), server.engine.stats()
    assert metric(server.url, "vllm:request_success_total", {"finished_reason": "abort"}) == aborted + 1


@pytest.fixture(scope="module")
def lora_server(model_dir, hf_model, tmp_path_factory):
    adapter = make_adapter(hf_model, tmp_path_factory.mktemp("adapters") / "canary", seed=3,
                           target_modules=["q_proj", "v_proj", "down_proj"])
    config = tiny_engine_config(model_dir, lora=LoRAConfig(enable_lora=True, lora_modules={"canary": str(adapter)}))
    with ServerThread(AsyncEngine(config)) as s:
        yield s, adapter


def test_adapters_are_listed_and_served_exactly(lora_server, hf_model, tokenizer):
    server, adapter = lora_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards) == [MODEL, "canary"]
    assert (cards["canary"].root, cards["canary"].parent) == (str(adapter), MODEL)

    prompt = tokenizer.encode("The adapter says")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), str(adapter)).eval()
    answers = {}
    for name, reference in ((MODEL, hf_model), ("canary", peft_model)):
        res = client.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0, logprobs=0,
                                        extra_body=AS_IDS)
        answers[name] = token_ids(res.choices[0].logprobs.tokens)
        assert answers[name] == hf_greedy(reference, prompt, 10), name
    assert answers[MODEL] != answers["canary"]
