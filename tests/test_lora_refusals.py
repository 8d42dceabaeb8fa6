"""Every adapter loraserve cannot apply exactly is refused at load time, and the message names the
problem. One test per refusal."""

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, get_peft_model
from safetensors.torch import load_file, save_file

from lora_fixtures import make_adapter, tiny_model
from loraserve.lora import AdapterError, LoRAManager
from loraserve.lora.adapter import REFUSED_KEYS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_model()


def refuse(model: torch.nn.Module, path: Path, max_lora_rank: int | None = None) -> str:
    manager = LoRAManager(copy.deepcopy(model), max_loras=2, max_lora_rank=max_lora_rank)
    with pytest.raises(AdapterError) as err:
        manager.load("bad", str(path))
    assert manager.names() == []
    return str(err.value)


def edit_config(path: Path, **changes) -> Path:
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return path


def edit_tensors(path: Path, fn) -> Path:
    tensors = load_file(path / "adapter_model.safetensors")
    save_file(fn(tensors), path / "adapter_model.safetensors")
    return path


@pytest.mark.parametrize("config_cls,name", [(LoHaConfig, "LOHA"), (LoKrConfig, "LOKR"), (IA3Config, "IA3")])
def test_non_lora_method(base, tmp_path: Path, config_cls, name: str) -> None:
    kwargs = {"feedforward_modules": []} if config_cls is IA3Config else {}
    get_peft_model(copy.deepcopy(base), config_cls(target_modules=["q_proj"], **kwargs)).save_pretrained(tmp_path)
    msg = refuse(base, tmp_path)
    assert f"is a {name} adapter" in msg and "only LoRA" in msg


@pytest.mark.parametrize("key,value", [("use_qalora", True), ("layer_replication", [[0, 2], [1, 2]]),
                                       ("alora_invocation_tokens", [5, 6]), ("target_parameters", ["mlp.w"]),
                                       ("megatron_config", {"x": 1}), ("kasa_config", {"r": 1})])
def test_option_that_changes_the_math(base, tmp_path: Path, key: str, value) -> None:
    assert key in REFUSED_KEYS
    msg = refuse(base, edit_config(make_adapter(base, tmp_path), **{key: value}))
    assert f"sets {key}=" in msg and "not supported" in msg


def test_unknown_option(base, tmp_path: Path) -> None:
    msg = refuse(base, edit_config(make_adapter(base, tmp_path), use_shiny_new_thing=True))
    assert "does not know: use_shiny_new_thing=True" in msg


def test_unknown_option_left_at_default_is_fine(base, tmp_path: Path) -> None:
    path = edit_config(make_adapter(base, tmp_path), some_future_option=None)
    LoRAManager(copy.deepcopy(base), max_loras=1).load("ok", str(path))


def test_init_that_rewrites_the_base(base, tmp_path: Path) -> None:
    msg = refuse(base, edit_config(make_adapter(base, tmp_path), init_lora_weights="pissa"))
    assert "init_lora_weights='pissa'" in msg and "path_initial_model_for_weight_conversion" in msg


def test_tensors_for_missing_modules(base, tmp_path: Path) -> None:
    """An adapter for a deeper model: its layer-2 tensors would be silently dropped."""
    bigger = tiny_model()
    bigger.model.layers.append(copy.deepcopy(bigger.model.layers[1]))
    bigger.config.num_hidden_layers = 3
    msg = refuse(base, make_adapter(bigger, tmp_path))
    assert "4 tensor(s) for modules the served model does not have" in msg
    assert "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight" in msg


def test_multimodal_vision_tensors(tmp_path: Path) -> None:
    """A multimodal adapter that also changes the vision tower: on a text-only model those would be lost."""
    base = tiny_model("gemma3")
    path = make_adapter(base, tmp_path)

    def add_vision(t: dict) -> dict:
        t = {k.replace(".model.model.", ".model.model.language_model."): v for k, v in t.items()}
        t["base_model.model.model.vision_tower.encoder.layers.0.q_proj.lora_A.weight"] = torch.ones(4, 8)
        return t
    msg = refuse(base, edit_tensors(path, add_vision))
    assert "model.vision_tower.encoder.layers.0.q_proj.lora_A.weight" in msg and "1 tensor(s)" in msg


def test_shapes_of_another_base(base, tmp_path: Path) -> None:
    other = tiny_model()
    other.model.layers[0].mlp.up_proj = torch.nn.Linear(64, 96, bias=False)
    msg = refuse(base, make_adapter(other, tmp_path, target_modules=["up_proj"]))
    assert "'model.layers.0.mlp.up_proj'" in msg and "B [96, 4]" in msg and "B [128, r]" in msg


def test_rank_above_cap(base, tmp_path: Path) -> None:
    msg = refuse(base, make_adapter(base, tmp_path, r=8), max_lora_rank=4)
    assert "rank 8, above this server's max_lora_rank 4" in msg and "never clips" in msg


def test_untrained_adapter(base, tmp_path: Path) -> None:
    msg = refuse(base, make_adapter(base, tmp_path, randomize_weights=False))
    assert "this adapter changes nothing" in msg and "lora_B is zero" in msg


def test_tensors_the_config_does_not_target(base, tmp_path: Path) -> None:
    msg = refuse(base, edit_config(make_adapter(base, tmp_path), target_modules=["q_proj"]))
    assert "does not target (PEFT would silently ignore them)" in msg and "v_proj.lora_A.weight" in msg


def test_rank_differs_from_config(base, tmp_path: Path) -> None:
    msg = refuse(base, edit_config(make_adapter(base, tmp_path, r=4), r=8))
    assert "LoRA rank 4 in the weights but 8 in adapter_config" in msg


def test_half_a_lora_pair(base, tmp_path: Path) -> None:
    drop = "layers.0.self_attn.q_proj.lora_B.weight"
    path = edit_tensors(make_adapter(base, tmp_path), lambda t: {k: v for k, v in t.items() if not k.endswith(drop)})
    assert "'model.layers.0.self_attn.q_proj' has only one of its LoRA A/B tensors" in refuse(base, path)


def test_modules_to_save_of_a_norm(base, tmp_path: Path) -> None:
    msg = refuse(base, make_adapter(base, tmp_path, modules_to_save=["norm"]))
    assert "modules_to_save names module" in msg and "LlamaRMSNorm" in msg


def test_resized_vocabulary(tmp_path: Path) -> None:
    base = tiny_model()
    bigger = copy.deepcopy(base)
    bigger.resize_token_embeddings(260)
    msg = refuse(base, make_adapter(bigger, tmp_path, modules_to_save=["embed_tokens"]))
    assert "[260, 64] does not fit the served model's [256, 64]" in msg


def test_embedding_copy_of_another_base(base, tmp_path: Path) -> None:
    """PEFT saves the base embedding with an embedding LoRA; if it is not ours, the adapter was trained
    on another base."""
    other = tiny_model(seed=9)
    msg = refuse(base, make_adapter(other, tmp_path, target_modules=["embed_tokens"]))
    assert "carries its own base weight for 'model.embed_tokens' that differs" in msg


def test_dora_on_embedding(base, tmp_path: Path) -> None:
    msg = refuse(base, make_adapter(base, tmp_path, use_dora=True, target_modules=["embed_tokens", "q_proj"]))
    assert "DoRA only to Linear" in msg


def test_ensure_weight_tying(tmp_path: Path) -> None:
    base = tiny_model(tie=True)
    path = make_adapter(base, tmp_path, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                        ensure_weight_tying=True)
    assert "ensure_weight_tying" in refuse(base, path)


def test_not_an_adapter_directory(base, tmp_path: Path) -> None:
    assert "no adapter_config.json" in refuse(base, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    assert "no adapter_model.safetensors or adapter_model.bin" in refuse(base, tmp_path)
