"""Bad input over real HTTP: each gets an OpenAI-shaped error body that says what is wrong, and the
server keeps serving afterwards."""

import httpx
import openai
import pytest

from loraserve.engine.async_engine import AsyncEngine
from server_fixtures import MAX_MODEL_LEN, ServerThread, tiny_engine_config

MODEL = "tiny-llama"
KEY = "sk-test-key"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER_HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def keyed_server(model_dir):
    with ServerThread(AsyncEngine(tiny_engine_config(model_dir)), api_key=KEY) as s:
        yield s


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def assert_still_serves(url: str, headers: dict | None = None) -> None:
    res = httpx.post(url + COMPLETIONS, json={"model": MODEL, "prompt": "ok", "max_tokens": 2}, headers=headers)
    assert res.status_code == 200 and res.json()["usage"]["completion_tokens"] >= 1


def error_of(res: httpx.Response, status: int, code: str) -> dict:
    assert res.status_code == status, res.text
    error = res.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT, "/generate"])
@pytest.mark.parametrize("raw", [b'{"prompt": "hi", ', b"", b"not json"])
def test_malformed_json_is_400(server, path, raw):
    res = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"})
    assert "not valid JSON" in error_of(res, 400, "invalid_json")["message"]
    assert_still_serves(server.url)


@pytest.mark.parametrize("path,body,param", [
    (COMPLETIONS, {"prompt": "hi", "temperature": "hot"}, "temperature"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": "10"}, "max_tokens"),
    (COMPLETIONS, {"prompt": 42}, "prompt"),
    (COMPLETIONS, {"prompt": "hi", "stream": "yes"}, "stream"),
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    (CHAT, {"messages": USER_HI, "logprobs": 3}, "logprobs"),
    ("/generate", {"prompt": ["a", "b"]}, "prompt"),
    (COMPLETIONS, [1, 2, 3], None),
])
def test_wrong_types_are_400_naming_the_field(server, path, body, param):
    error = error_of(httpx.post(server.url + path, json=body), 400, "invalid_type")
    assert error["param"] == param
    if param is not None:
        assert f"'{param}" in error["message"]
    assert_still_serves(server.url)


@pytest.mark.parametrize("path,body,field", [
    (COMPLETIONS, {"prompt": "hi", "best_of": 2}, "best_of"),
    (COMPLETIONS, {"prompt": "hi", "logit_bias": {"1": 5}}, "logit_bias"),
    (COMPLETIONS, {"prompt": "hi", "echo": True}, "echo"),
    (CHAT, {"messages": USER_HI, "tools": []}, "tools"),
    (CHAT, {"messages": USER_HI, "response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"messages": USER_HI, "stream_options": {"continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
    ("/generate", {"prompt": "hi", "stream": True}, "stream"),
])
def test_unsupported_fields_are_refused_by_name(server, path, body, field):
    error = error_of(httpx.post(server.url + path, json=body), 400, "unsupported_field")
    assert f"'{field}'" in error["message"] and error["param"] == field
    assert_still_serves(server.url)


def test_null_fields_mean_unset(server):
    res = httpx.post(server.url + COMPLETIONS, json={"prompt": "hi", "max_tokens": 2, "logit_bias": None,
                                                     "temperature": None})
    assert res.status_code == 200


def test_unsupported_field_through_the_openai_client(server):
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client(server.url).completions.create(model=MODEL, prompt="hi", best_of=3)


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_404_listing_served_names(server, stream):
    with pytest.raises(openai.NotFoundError) as info:
        client(server.url).chat.completions.create(model="gpt-4o", messages=USER_HI, stream=stream)
    error = info.value.body
    assert error["code"] == "model_not_found" and "gpt-4o" in error["message"] and MODEL in error["message"]
    res = httpx.post(server.url + "/generate", json={"prompt": "hi", "model": "nope"})
    assert MODEL in error_of(res, 404, "model_not_found")["message"]
    assert_still_serves(server.url)


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_plus_max_tokens_over_context_is_400_with_both_numbers(server, stream):
    prompt = list(range(1000, 1300))          # 300 tokens
    with pytest.raises(openai.BadRequestError) as info:
        client(server.url).completions.create(model=MODEL, prompt=prompt, max_tokens=300, stream=stream)
    error = info.value.body
    assert error["code"] == "context_length_exceeded"
    for number in (MAX_MODEL_LEN, 300, 600):
        assert str(number) in error["message"]
    assert_still_serves(server.url)


def test_chat_prompt_that_fills_the_context_is_400(server):
    long = " ".join(["word"] * (MAX_MODEL_LEN + 10))
    res = httpx.post(server.url + CHAT, json={"messages": [{"role": "user", "content": long}]})
    assert str(MAX_MODEL_LEN) in error_of(res, 400, "context_length_exceeded")["message"]


@pytest.mark.parametrize("path,body,param", [
    (COMPLETIONS, {"prompt": ""}, "prompt"),
    (COMPLETIONS, {"prompt": []}, "prompt"),
    (COMPLETIONS, {"prompt": ["ok", ""]}, "prompt"),
    (COMPLETIONS, {"prompt": [10**9]}, "prompt"),
    (CHAT, {"messages": []}, "messages"),
    ("/generate", {"prompt": ""}, "prompt"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    (CHAT, {"messages": USER_HI, "max_tokens": -1}, "max_tokens"),
    (CHAT, {"messages": USER_HI, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("/generate", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "temperature": -1}, "temperature"),
    (COMPLETIONS, {"prompt": "hi", "top_p": 0}, "top_p"),
    (COMPLETIONS, {"prompt": "hi", "n": 0}, "n"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, "logprobs"),
    (CHAT, {"messages": USER_HI, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"messages": USER_HI, "logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    (COMPLETIONS, {"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
])
def test_bad_values_are_400_naming_the_field(server, path, body, param):
    error = error_of(httpx.post(server.url + path, json=body), 400, "invalid_value")
    assert error["param"] == param and param in error["message"]
    assert_still_serves(server.url)


def test_empty_prompt_through_the_openai_client(server):
    with pytest.raises(openai.BadRequestError, match="empty"):
        client(server.url).completions.create(model=MODEL, prompt="", stream=True)


def test_unknown_route_and_method_are_openai_shaped(server):
    error_of(httpx.get(server.url + "/v1/nothing"), 404, "invalid_route")
    error_of(httpx.get(server.url + COMPLETIONS), 405, "invalid_route")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("POST", COMPLETIONS), ("POST", CHAT),
                                         ("POST", "/generate")])
def test_missing_or_bad_api_key_is_401(keyed_server, headers, method, path):
    res = httpx.request(method, keyed_server.url + path, json={"prompt": "hi", "messages": USER_HI},
                        headers=headers)
    error = error_of(res, 401, "invalid_api_key")
    assert error["type"] == "authentication_error"
    assert ("Missing" in error["message"]) == (headers == {})


def test_right_api_key_serves_and_probes_need_none(keyed_server):
    assert_still_serves(keyed_server.url, headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(openai.AuthenticationError):
        client(keyed_server.url, "wrong").models.list()
    assert [m.id for m in client(keyed_server.url, KEY).models.list().data] == [MODEL]
    for path in ("/health", "/version", "/metrics"):
        assert httpx.get(keyed_server.url + path).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_request_larger_than_the_whole_kv_cache_is_400_before_streaming(model_dir, stream):
    """8 blocks of 16 tokens hold 128 tokens: a 200-token request fits the context but never the cache."""
    with ServerThread(AsyncEngine(tiny_engine_config(model_dir, num_kv_blocks=8))) as small:
        res = httpx.post(small.url + COMPLETIONS, json={"prompt": list(range(100, 200)), "max_tokens": 100,
                                                        "stream": stream})
        assert "128" in error_of(res, 400, "invalid_value")["message"]
        assert_still_serves(small.url)
