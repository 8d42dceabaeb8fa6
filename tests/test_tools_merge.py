"""`loraserve merge`: the written directory, loaded by plain transformers, equals PeftModel with the
adapter (float32, max |logit diff| < 1e-4) for every option that needs care: embedding / lm_head
LoRA on tied models (which a naive merge gets wrong), DoRA, modules_to_save, trainable tokens, bias,
Gemma 3, a multimodal prefix. The integration test serves a merged real SmolLM2 adapter with
embed_tokens + lm_head LoRA through loraserve and compares greedy answers with PEFT's."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_fixtures import make_adapter, peft_logits, tiny_model
from loraserve.cli import main
from loraserve.tools.merge import merge

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def merged_logits(out) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("arch, tie, kwargs", [
    ("llama", True, dict(target_modules=["q_proj", "embed_tokens"])),
    ("llama", True, dict(target_modules=["v_proj", "lm_head"])),
    ("llama", False, dict(target_modules=["q_proj", "embed_tokens", "lm_head"], use_rslora=True)),
    ("llama", False, dict(use_dora=True)),
    ("llama", True, dict(modules_to_save=["lm_head"])),
    ("llama", True, dict(trainable_token_indices=[1, 5, 7])),
    ("qwen2", False, dict(bias="all", rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})),
    ("gemma3", True, dict(target_modules=["q_proj", "o_proj", "embed_tokens"])),
], ids=["tied-embed", "tied-lm_head", "untied-embed+head-rslora", "dora", "tied-modules_to_save",
        "tied-trainable-tokens", "qwen2-bias-patterns", "gemma3-tied-embed"])
def test_merged_directory_equals_peft(tmp_path, arch, tie, kwargs):
    base = tiny_model(arch, tie=tie)
    base.save_pretrained(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", **kwargs)
    result = merge(str(adapter), str(tmp_path / "base"), tmp_path / "out")
    assert result["ok"] and result["merge_vs_peft_max_abs_diff"] < 1e-4 and not result["saved_tensors_differing"]
    diff = (merged_logits(tmp_path / "out") - peft_logits(base, adapter, IDS)).abs().max().item()
    assert diff < 1e-4
    touches_embeddings = "embed" in str(kwargs) or "lm_head" in str(kwargs) or "token" in str(kwargs)
    assert result["untied_embeddings"] == (tie and touches_embeddings)


def test_naive_merge_of_a_tied_embedding_lora_is_wrong(tmp_path):
    """Why merge unties: PEFT's own merge_and_unload writes the embedding change into the weight the
    output layer shares, so the merged model no longer equals PeftModel."""
    base = tiny_model("llama", tie=True)
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "embed_tokens"])
    naive = PeftModel.from_pretrained(tiny_model("llama", tie=True), str(adapter)).merge_and_unload()
    with torch.no_grad():
        diff = (naive(input_ids=IDS).logits - peft_logits(base, adapter, IDS)).abs().max().item()
    assert diff > 1e-2


def test_multimodal_prefix_is_mapped_onto_a_text_only_base(tmp_path):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    plain = make_adapter(base, tmp_path / "plain")
    prefixed = make_adapter(base, tmp_path / "prefixed")
    path = prefixed / "adapter_model.safetensors"
    save_file({k.replace("model.model.", "model.model.language_model."): v for k, v in load_file(path).items()},
              path)
    result = merge(str(prefixed), str(tmp_path / "base"), tmp_path / "out")
    assert result["ok"]
    diff = (merged_logits(tmp_path / "out") - peft_logits(base, plain, IDS)).abs().max().item()
    assert diff < 1e-4


def test_bfloat16_output_holds_exactly_the_rounded_merged_weights(tmp_path):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter")
    result = merge(str(adapter), str(tmp_path / "base"), tmp_path / "out", dtype="bfloat16")
    assert result["ok"] and result["saved_tensors_differing"] == []
    assert 0 < result["saved_vs_peft_max_abs_diff"] < 0.1   # rounding, reported not judged
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_cli_exit_codes(tmp_path, capsys):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    untrained = make_adapter(base, tmp_path / "untrained", randomize_weights=False)
    good = make_adapter(base, tmp_path / "good")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")

    def run(*argv: str) -> int:
        with pytest.raises(SystemExit) as exit_:
            main(["merge", *argv])
        return exit_.value.code

    assert run(str(good), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "full")) == 2
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert run(str(untrained), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "o1"), "--json") == 1
    assert "changes nothing" in json.loads(capsys.readouterr().out)["error"]
    assert run(str(good), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "o2")) == 0
    assert "OK: merged" in capsys.readouterr().out


@pytest.mark.integration
def test_merged_smollm2_with_embedding_and_lm_head_lora_serves_like_peft(tmp_path):
    """A real SmolLM2-135M-Instruct adapter (tied embeddings; LoRA on embed_tokens, lm_head and
    attention), merged, then served by loraserve in float32: greedy chat answers equal PEFT's."""
    import openai

    from loraserve.config import EngineConfig
    from loraserve.engine.async_engine import AsyncEngine
    from loraserve.model.loader import model_dir
    from server_fixtures import ServerThread, smollm2_gguf

    base_dir = model_dir(str(smollm2_gguf()))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=16,
                           target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"])
    path = adapter / "adapter_model.safetensors"   # trained-sized deltas: answers change but stay fluent
    save_file({k: v * 0.05 if "lora_B" in k or "lora_embedding_B" in k else v for k, v in load_file(path).items()},
              path)
    result = merge(str(adapter), str(base_dir), tmp_path / "merged")
    assert result["ok"] and result["untied_embeddings"]

    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    prompts = ["What is the capital of France?", "Write a haiku about autumn."]
    expected = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=24, pad_token_id=tokenizer.eos_token_id)
        expected.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    with peft_model.disable_adapter():
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=24, pad_token_id=tokenizer.eos_token_id)
    base_answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    config = EngineConfig(model=str(tmp_path / "merged"), served_model_name="merged", dtype="float32", device="cpu",
                          max_model_len=512, num_kv_blocks=64)
    with ServerThread(AsyncEngine(config)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        got = [client.chat.completions.create(model="merged", messages=[{"role": "user", "content": p}],
                                              max_tokens=24, temperature=0).choices[0].message.content
               for p in prompts]
    assert got == expected
    assert expected[-1] != base_answer   # the adapter really changes the answer
