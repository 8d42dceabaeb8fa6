"""`loraserve inspect`: what the tensors say (ranks and alphas per module, module types, copies,
size, untrained), and with --base loraserve's own validation and a measured effect."""

import json

import pytest

from lora_fixtures import make_adapter, tiny_model
from loraserve.cli import main


def inspect(capsys, *argv: str) -> tuple[int, dict]:
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", *argv, "--json"])
    return exit_.value.code, json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = tiny_model("llama")
    folder = tmp_path_factory.mktemp("inspect") / "llama"
    model.save_pretrained(folder)
    return model, folder


def test_ranks_alphas_types_and_size_from_the_tensors(capsys, llama, tmp_path):
    model, _ = llama
    adapter = make_adapter(model, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"],
                           rank_pattern={"v_proj": 2}, alpha_pattern={"lm_head": 32}, use_rslora=True)
    code, r = inspect(capsys, str(adapter))
    assert code == 0 and r["problems"] == []
    assert r["ranks"] == {"2": 2, "4": 3} and r["alphas"] == {"8": 4, "32": 1}
    assert r["lora_modules_by_type"] == {"lm_head": 1, "q_proj": 2, "v_proj": 2}
    assert r["modules"]["lm_head"]["scaling"] == pytest.approx(32 / 2)   # rsLoRA: alpha / sqrt(r)
    assert r["options"]["use_rslora"] is True and r["num_tensors"] == 10 + 1   # + lm_head's base copy
    assert r["num_bytes"] == 4 * r["num_params"] and r["dtypes"] == ["float32"]


def test_module_copies_dora_and_tokens_are_listed(capsys, llama, tmp_path):
    model, _ = llama
    adapter = make_adapter(model, tmp_path / "a", use_dora=True, modules_to_save=["lm_head"],
                           trainable_token_indices=[1, 2])
    code, r = inspect(capsys, str(adapter))
    assert code == 0
    assert r["other_parts"] == {"dora_magnitude": [f"model.layers.{i}.self_attn.{m}" for i in (0, 1)
                                                   for m in ("q_proj", "v_proj")],
                                "full_weight": ["lm_head"], "trainable_tokens": ["model.embed_tokens"]}


def test_untrained_adapter_is_a_problem(capsys, llama, tmp_path):
    model, _ = llama
    code, r = inspect(capsys, str(make_adapter(model, tmp_path / "a", randomize_weights=False)))
    assert code == 1 and r["untrained"] and r["lora_b_zero"] == "4/4"
    assert any(p.startswith("untrained") for p in r["problems"])


def test_with_base_validates_and_measures_the_effect(capsys, llama, tmp_path):
    model, folder = llama
    code, r = inspect(capsys, str(make_adapter(model, tmp_path / "a")), "--base", str(folder))
    assert code == 0 and r["fits_base"]
    assert r["effect"]["probes"] == 4 and r["effect"]["kl_max"] > 1e-6


def test_with_another_base_it_is_refused_by_name(capsys, llama, tmp_path):
    _, folder = llama
    other = tiny_model("llama")
    other.config.hidden_size = 32   # a model of another shape: same module names, different sizes
    from transformers import LlamaForCausalLM
    adapter = make_adapter(LlamaForCausalLM(other.config), tmp_path / "a")
    code, r = inspect(capsys, str(adapter), "--base", str(folder))
    assert code == 1 and not r["fits_base"] and "do not fit the served model" in r["fit_error"]


def test_text_output_and_usage_error(capsys, llama, tmp_path):
    model, _ = llama
    adapter = make_adapter(model, tmp_path / "a")
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", str(adapter)])
    assert exit_.value.code == 0 and "ranks: 4 (x4); alphas: 8 (x4)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", str(tmp_path / "missing")])
    assert exit_.value.code == 2
