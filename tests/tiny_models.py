"""Tiny random models of each architecture the engine must run, built from real transformers configs."""

import copy
import os

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Gemma4ForCausalLM,
    Gemma4TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 128
COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, max_position_embeddings=512)


def _configs() -> dict:
    return {
        "llama": (LlamaForCausalLM, LlamaConfig(num_hidden_layers=2, **COMMON)),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(num_hidden_layers=2, **COMMON)),
        "qwen3": (Qwen3ForCausalLM, Qwen3Config(num_hidden_layers=2, head_dim=16, **COMMON)),
        "mistral": (MistralForCausalLM, MistralConfig(num_hidden_layers=2, sliding_window=8, **COMMON)),
        "gemma2": (Gemma2ForCausalLM, Gemma2Config(num_hidden_layers=2, head_dim=16, sliding_window=8,
                                                   **COMMON)),
        "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig(num_hidden_layers=3, head_dim=16, sliding_window=8,
                                                       layer_types=["sliding_attention", "sliding_attention",
                                                                    "full_attention"], **COMMON)),
        "gemma4": (Gemma4ForCausalLM, Gemma4TextConfig(
            num_hidden_layers=4, head_dim=16, global_head_dim=32, sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            num_kv_shared_layers=2, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
            **COMMON)),
    }


ARCHS = list(_configs())
# Where the tiny models (and so the engines built on them) live: cpu here and in CI; on a GPU machine
# LORASERVE_TEST_DEVICE=cuda runs the parity and isolation tests there (bench/device/run.sh).
TEST_DEVICE = torch.device(os.environ.get("LORASERVE_TEST_DEVICE", "cpu"))


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(model, reference): two independent copies with the same random weights, so the engine's
    attention switch on one cannot touch the other."""
    cls, config = _configs()[arch]
    torch.manual_seed(seed)
    model = cls(copy.deepcopy(config)).to(TEST_DEVICE, dtype).eval()
    ref = cls(copy.deepcopy(config)).to(TEST_DEVICE, dtype).eval()
    ref.load_state_dict(model.state_dict())
    return model, ref


class IdTokenizer:
    """Decodes ids to space-separated numbers: lets engine tests run without a tokenizer file."""
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(f" {i}" for i in ids)
