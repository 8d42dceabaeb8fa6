"""`loraserve doctor`: one adapter (or launch command) per cause vLLM would drop or refuse, each read
back from the JSON the command prints, plus a clean case that must pass. Through `loraserve.cli.main`,
so the exit codes are the ones a CI sees."""

import json
import shlex

import pytest
from safetensors.torch import load_file, save_file

from lora_fixtures import make_adapter, tiny_model
from loraserve.cli import main


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("doctor")


@pytest.fixture(scope="module")
def llama(root):
    """A local Llama directory: doctor reads its config.json (architecture, text-only)."""
    model = tiny_model("llama")
    model.save_pretrained(root / "llama")
    return model, root / "llama"


@pytest.fixture(scope="module")
def gemma3_dir(root):
    tiny_model("gemma3").save_pretrained(root / "gemma3")
    return root / "gemma3"


def doctor(capsys, adapter, command: str, *extra: str) -> tuple[int, dict]:
    with pytest.raises(SystemExit) as exit_:
        main(["doctor", str(adapter), "--vllm", command, "--json", *extra])
    out = capsys.readouterr().out
    return exit_.value.code, json.loads(out) if out.strip() else {}


def rules(report: dict, certain: bool = True) -> set[str]:
    return {f["rule"] for f in report["findings"] if f["certain"] == certain}


def serve(model_dir, adapter, *flags: str, name: str = "tuned") -> str:
    return shlex.join(["vllm", "serve", str(model_dir), "--enable-lora", "--lora-modules", f"{name}={adapter}",
                       *flags])


def set_config(adapter, **changes) -> None:
    """Edit adapter_config.json the way a hand-edited or newer-PEFT adapter would have it."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(cfg, **changes)))


def config_only_model(root, arch: str, **config) -> str:
    """A model directory with only config.json: all doctor reads of a local model (architecture, text-only)."""
    path = root / arch
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": [arch], **config}))
    return str(path)


def finding(report: dict, rule: str) -> dict:
    return next(f for f in report["findings"] if f["rule"] == rule)


def test_clean_adapter_passes_and_names_the_request_model(capsys, llama, tmp_path):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a")
    code, report = doctor(capsys, adapter, serve(model_dir, adapter), "--model-name", "tuned")
    assert code == 0 and report["ok"] and report["findings"] == []
    assert report["request_model_name"] == "tuned" and report["corrected_command"] is None
    assert "v0.32.0" in report["vllm_rules_read_from"]
    assert "vllm/lora/worker_manager.py" in report["vllm_rules_read_from"]


def test_lora_not_enabled_is_fixed_by_the_corrected_command(capsys, llama, tmp_path):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a")
    code, report = doctor(capsys, adapter, f"vllm serve {model_dir} --lora-modules tuned={adapter} --port 8001")
    assert code == 1 and rules(report) == {"lora_disabled"}
    # vLLM 0.32 does not start with --lora-modules and no --enable-lora
    found = finding(report, "lora_disabled")
    assert "stops at start-up" in found["detail"]
    assert "LoRA is not enabled. Use --enable-lora to enable LoRA." in found["vllm_does"]
    fixed = report["corrected_command"]
    assert "--enable-lora" in shlex.split(fixed)
    assert doctor(capsys, adapter, fixed)[0] == 0   # the printed fix really fixes it


def test_lora_not_enabled_without_lora_modules(capsys, llama, tmp_path):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a")
    code, report = doctor(capsys, adapter, f"vllm serve {model_dir}")
    assert code == 1 and rules(report) == {"lora_disabled", "not_registered"}
    assert finding(report, "lora_disabled")["detail"] == "the command has no --enable-lora"


def test_unregistered_adapter_is_added_to_the_existing_lora_modules_list(capsys, llama, tmp_path):
    model, model_dir = llama
    adapter, other = make_adapter(model, tmp_path / "a"), make_adapter(model, tmp_path / "other")
    code, report = doctor(capsys, adapter, serve(model_dir, other, name="other"), "--model-name", "mine")
    assert code == 1 and rules(report) == {"not_registered"}
    fixed = shlex.split(report["corrected_command"])
    i = fixed.index("--lora-modules")   # one list: a second --lora-modules flag would replace the first
    assert fixed.count("--lora-modules") == 1 and fixed[i + 1:i + 3] == [f"mine={adapter}", f"other={other}"]
    assert doctor(capsys, adapter, report["corrected_command"], "--model-name", "mine")[0] == 0


@pytest.mark.parametrize("value, on", [("True", True), ("1", True), (" true ", True), ("yes", False), ("0", False)])
def test_runtime_loading_makes_an_unregistered_adapter_a_warning(capsys, llama, tmp_path, value, on):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a")
    # vLLM reads the variable with .strip().lower() in ("1", "true") (envs.py)
    command = shlex.join([f"VLLM_ALLOW_RUNTIME_LORA_UPDATING={value}", "vllm", "serve", str(model_dir),
                          "--enable-lora"])
    code, report = doctor(capsys, adapter, command)
    assert code == (0 if on else 1) and rules(report, certain=not on) == {"not_registered"}


def test_request_naming_the_base_gets_base_output(capsys, llama, tmp_path):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a")
    code, report = doctor(capsys, adapter, serve(model_dir, adapter, "--served-model-name", "base"),
                          "--model-name", "base")
    assert code == 1 and rules(report) == {"request_names_base"} and report["request_model_name"] == "tuned"


def test_request_under_another_name_is_a_404(capsys, llama, tmp_path):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a")
    code, report = doctor(capsys, adapter, serve(model_dir, adapter), "--model-name", "tuned-v2")
    assert code == 1 and rules(report) == {"request_name_unknown"}


def test_rank_over_the_default_cap_gets_the_next_allowed_cap(capsys, llama, tmp_path):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a", r=20)
    code, report = doctor(capsys, adapter, serve(model_dir, adapter))
    assert code == 1 and rules(report) == {"rank_over_cap"}
    fixed = shlex.split(report["corrected_command"])
    assert fixed[fixed.index("--max-lora-rank") + 1] == "32"   # vLLM accepts only its listed ranks
    assert doctor(capsys, adapter, report["corrected_command"])[0] == 0


def test_rank_pattern_above_an_explicit_cap(capsys, llama, tmp_path):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a", r=8, rank_pattern={"v_proj": 64})
    code, report = doctor(capsys, adapter, serve(model_dir, adapter, "--max-lora-rank", "32"))
    # vLLM 0.32 caps max(r, *rank_pattern) and applies the pattern per module: the cap is the only problem
    assert code == 1 and rules(report) == {"rank_over_cap"} and report["merge_command"] is None
    assert "max(r, *rank_pattern.values())" in finding(report, "rank_over_cap")["vllm_does"]
    fixed = shlex.split(report["corrected_command"])
    assert fixed[fixed.index("--max-lora-rank") + 1] == "64"
    assert doctor(capsys, adapter, report["corrected_command"])[0] == 0


def test_rank_and_alpha_patterns_are_applied_per_module(capsys, llama, tmp_path):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a", r=8, rank_pattern={"v_proj": 16}, alpha_pattern={"q_proj": 32})
    code, report = doctor(capsys, adapter, serve(model_dir, adapter))
    assert code == 0 and report["findings"] == []


def test_rank_beyond_any_vllm_cap_needs_a_merge(capsys, llama, tmp_path):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a", r=1024)
    code, report = doctor(capsys, adapter, serve(model_dir, adapter))
    assert code == 1 and rules(report) == {"rank_over_vllm_max"}
    assert shlex.split(report["merge_command"])[:5] == ["loraserve", "merge", str(adapter), "--base", str(model_dir)]


@pytest.mark.parametrize("kwargs, rule", [
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(use_dora=True), "dora"),
    (dict(bias="lora_only"), "bias"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(trainable_token_indices=[1, 2, 3]), "trainable_tokens"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_options_vllm_refuses_or_misapplies_need_a_merge(capsys, llama, tmp_path, kwargs, rule):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a", **kwargs)
    code, report = doctor(capsys, adapter, serve(model_dir, adapter))
    assert code == 1 and rule in rules(report)
    assert report["corrected_command"] is None and report["merge_command"].startswith("loraserve merge")
    assert report["serve_merged_command"].endswith("--served-model-name tuned")


def test_modules_to_save_outside_the_classification_heads(capsys, llama, tmp_path):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a", modules_to_save=["lm_head"])
    code, report = doctor(capsys, adapter, serve(model_dir, adapter))
    found = finding(report, "modules_to_save")
    assert code == 1 and found["certain"] and found["outcome"] == "refused at load"
    assert 'either None or ["classifier", "score"] for classification models' in found["vllm_does"]


@pytest.mark.parametrize("flags, refused", [((), True), (("--convert", "classify"), False)])
def test_classification_head_copy_needs_a_classification_model(capsys, llama, tmp_path, flags, refused):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a")
    set_config(adapter, modules_to_save=["score"])   # passes validate_legal, then needs a classification head
    code, report = doctor(capsys, adapter, serve(model_dir, adapter, *flags))
    assert ("modules_to_save" in rules(report)) == refused and code == int(refused)


def test_lora_bias_flag_alone_is_refused(capsys, llama, tmp_path):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a")
    set_config(adapter, lora_bias=True)   # no lora_B.bias tensor: vLLM 0.32 refuses the config flag itself
    code, report = doctor(capsys, adapter, serve(model_dir, adapter))
    assert code == 1 and rules(report) == {"lora_bias"}
    assert "vLLM does not support LoRA bias (lora_bias)." in finding(report, "lora_bias")["vllm_does"]


@pytest.mark.parametrize("changes, key", [
    (dict(alora_invocation_tokens=[5, 6]), "alora_invocation_tokens"),
    (dict(layer_replication=[[0, 2], [1, 2]]), "layer_replication"),
    (dict(use_bdlora={"target_modules": ["q_proj"], "nblocks": 2}), "use_bdlora"),
    (dict(use_qalora=True), "use_qalora"),
    (dict(r=0), "r=0"),
    (dict(r=-4), "r=-4"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_peft_options_vllm_refuses(capsys, llama, tmp_path, changes, key):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a")
    set_config(adapter, **changes)
    code, report = doctor(capsys, adapter, serve(model_dir, adapter))
    assert code == 1 and rules(report) == {"unsupported_peft_option"}
    found = finding(report, "unsupported_peft_option")
    assert key in found["detail"] and found["outcome"] == "refused at load" and found["fix"] == "retrain"
    assert report["merge_command"] is None and report["corrected_command"] is None


def test_peft_option_refusal_quotes_vllm(capsys, llama, tmp_path):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a")
    set_config(adapter, alora_invocation_tokens=[5, 6])
    with pytest.raises(SystemExit):
        main(["doctor", str(adapter), "--vllm", serve(model_dir, adapter)])
    text = capsys.readouterr().out
    assert "vLLM does not support Activated LoRA (aLoRA)." in text and "train the adapter again" in text


def test_embedding_lora_on_an_architecture_without_embedding_modules(capsys, root, gemma3_dir, tmp_path):
    adapter = make_adapter(tiny_model("gemma3"), tmp_path / "a", target_modules=["q_proj", "embed_tokens"])
    code, report = doctor(capsys, adapter, serve(gemma3_dir, adapter))
    assert code == 1 and "embedding_lora" in rules(report)
    # PEFT also saved the embedding's base weight, which vLLM skips: flagged, but only a warning
    assert "base_embedding_copy" in rules(report, certain=False)


def test_embedding_lora_on_llama_is_applied(capsys, llama, tmp_path):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a", target_modules=["q_proj", "lm_head"])
    code, report = doctor(capsys, adapter, serve(model_dir, adapter))
    assert code == 0 and rules(report) == set() and rules(report, certain=False) == {"base_embedding_copy"}


@pytest.mark.parametrize("arch, module, applied", [
    ("Qwen2ForCausalLM", "lm_head", False),      # declares no embedding_modules
    ("MistralForCausalLM", "lm_head", False),    # embedding_modules = {} (mistral.py)
    ("Ministral3ForCausalLM", "embed_tokens", False),   # registered as MistralForCausalLM
    ("Qwen3ForCausalLM", "lm_head", True),
    ("Phi3ForCausalLM", "lm_head", True),        # inherits LlamaForCausalLM's
    ("InternLM3ForCausalLM", "embed_tokens", True),   # registered as LlamaForCausalLM
    ("CohereForCausalLM", "embed_tokens", True),
    ("CohereForCausalLM", "lm_head", False),     # declares embed_tokens only
])
def test_embedding_lora_follows_the_architectures_embedding_modules(capsys, tmp_path, arch, module, applied):
    model_dir = config_only_model(tmp_path, arch)
    adapter = make_adapter(tiny_model("llama"), tmp_path / "a", target_modules=["q_proj", module])
    code, report = doctor(capsys, adapter, serve(model_dir, adapter))
    assert code == int(not applied) and ("embedding_lora" in rules(report)) != applied


def test_embedding_lora_on_an_unlisted_multimodal_model_is_a_warning(capsys, tmp_path):
    # a multimodal wrapper can take it through its inner language model's embedding_modules
    model_dir = config_only_model(tmp_path, "LlavaForConditionalGeneration", vision_config={})
    adapter = make_adapter(tiny_model("llama"), tmp_path / "a", target_modules=["q_proj", "lm_head"])
    code, report = doctor(capsys, adapter, serve(model_dir, adapter))
    assert code == 0 and "embedding_lora" in rules(report, certain=False)


def test_base_layer_copy_of_a_linear_is_refused(capsys, llama, tmp_path):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a")
    path = adapter / "adapter_model.safetensors"
    q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    save_file({**load_file(path), "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight": q}, path)
    code, report = doctor(capsys, adapter, serve(model_dir, adapter))
    # only the embed_tokens / lm_head copies are skipped; vLLM fails on this one ("... is unsupported LoRA weight")
    assert code == 1 and rules(report) == {"base_layer_copy"} and rules(report, certain=False) == set()
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in finding(report, "base_layer_copy")["detail"]


def test_embedding_lora_on_a_hub_model_is_a_warning(capsys, tmp_path):
    adapter = make_adapter(tiny_model("llama"), tmp_path / "a", target_modules=["q_proj", "lm_head"])
    code, report = doctor(capsys, adapter, serve("org/some-model", adapter))
    assert code == 0 and rules(report, certain=False) == {"embedding_lora", "base_embedding_copy"}


@pytest.mark.parametrize("init, refused", [
    ("pissa_niter_4", True), ("olora", True), ("corda", True), ("loftq", True), ("my_init", True),
    ("gaussian", False), ("EVA", False), ("orthogonal", False), ("mica", False), ("lora_ga", False),
    (False, False),
])
def test_init_lora_weights_outside_vllms_allowlist_is_refused(capsys, llama, tmp_path, init, refused):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a")
    set_config(adapter, init_lora_weights=init)
    code, report = doctor(capsys, adapter, serve(model_dir, adapter))
    assert code == int(refused) and rules(report) == ({"modified_base_init"} if refused else set())
    if refused:
        found = finding(report, "modified_base_init")
        assert found["outcome"] == "refused at load" and "vLLM does not support init_lora_weights" in found["vllm_does"]


@pytest.mark.parametrize("targets, missing", [
    (["o_proj"], ["q_proj", "v_proj"]),
    (["o_proj", "gate_proj"], ["q_proj", "v_proj"]),
    (["k_proj"], []),          # k_proj selects the packed qkv_proj, which runs q_proj and v_proj too
    (["qkv_proj"], []),
    (["model.layers.0.self_attn.qkv_proj", "model.layers.1.self_attn.qkv_proj"], []),   # vLLM's full names
    (["model.layers.0.self_attn.q_proj"], ["q_proj", "v_proj"]),   # q_proj runs inside qkv_proj: no such layer
])
def test_lora_target_modules_leaves_out_adapter_modules(capsys, llama, tmp_path, targets, missing):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a")   # q_proj, v_proj
    code, report = doctor(capsys, adapter, serve(model_dir, adapter, "--lora-target-modules", *targets))
    assert code == int(bool(missing)) and rules(report) == ({"lora_target_modules"} if missing else set())
    if missing:
        fixed = shlex.split(report["corrected_command"])
        i = fixed.index("--lora-target-modules")
        assert fixed.count("--lora-target-modules") == 1 and set(missing) <= set(fixed[i + 1:])
        assert doctor(capsys, adapter, report["corrected_command"])[0] == 0


def test_lora_target_modules_equals_form_is_rewritten_as_a_list(capsys, llama, tmp_path):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a", target_modules=["gate_proj", "down_proj"])
    code, report = doctor(capsys, adapter, serve(model_dir, adapter, "--lora-target-modules=up_proj", "--port", "1"))
    assert code == 1 and rules(report) == {"lora_target_modules"}
    assert finding(report, "lora_target_modules")["detail"].endswith("leaves out the adapter's down_proj")
    fixed = shlex.split(report["corrected_command"])
    assert fixed[-5:] == ["--lora-target-modules", "up_proj", "down_proj", "--port", "1"]
    assert doctor(capsys, adapter, report["corrected_command"])[0] == 0


def test_multimodal_prefix_on_a_text_only_model_applies_nothing(capsys, llama, tmp_path):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a")
    path = adapter / "adapter_model.safetensors"
    save_file({k.replace("model.model.", "model.model.language_model."): v for k, v in load_file(path).items()},
              path)
    code, report = doctor(capsys, adapter, serve(model_dir, adapter))
    assert code == 1 and rules(report) == {"language_model_prefix"}
    assert report["merge_command"]


def test_untrained_adapter(capsys, llama, tmp_path):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a", randomize_weights=False)
    code, report = doctor(capsys, adapter, serve(model_dir, adapter))
    assert code == 1 and rules(report) == {"untrained"} and report["merge_command"] is None


@pytest.mark.parametrize("form", ["python -m vllm.entrypoints.openai.api_server --model {m} {rest}",
                                  "docker run --gpus all -p 8000:8000 vllm/vllm-openai:latest --model {m} {rest}",
                                  "/opt/venv/bin/vllm serve {m} {rest}"])
def test_launch_forms(capsys, llama, tmp_path, form):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a")
    command = form.format(m=model_dir, rest=f"--lora-modules tuned={adapter} --max-lora-rank 8")
    code, report = doctor(capsys, adapter, command)
    assert code == 1 and rules(report) == {"lora_disabled"}
    assert shlex.split(report["corrected_command"])[-1] == "--enable-lora"


def test_text_output_names_each_cause_and_the_fix(capsys, llama, tmp_path):
    model, model_dir = llama
    adapter = make_adapter(model, tmp_path / "a", r=32, use_dora=True)
    with pytest.raises(SystemExit) as exit_:
        main(["doctor", str(adapter), "--vllm", f"vllm serve {model_dir}"])
    text = capsys.readouterr().out
    assert exit_.value.code == 1
    for words in ("lora_disabled", "not_registered", "rank_over_cap", "dora", "corrected launch command:",
                  "loraserve merge", "--max-lora-rank 32"):
        assert words in text


@pytest.mark.parametrize("command", ["python serve.py --model x", "vllm serve", "vllm serve m --lora-modules bad"])
def test_usage_errors_exit_2(capsys, llama, tmp_path, command):
    model, _ = llama
    adapter = make_adapter(model, tmp_path / "a")
    code, _ = doctor(capsys, adapter, command)
    assert code == 2


def test_missing_adapter_directory_is_a_usage_error(capsys, tmp_path):
    assert doctor(capsys, tmp_path / "nope", "vllm serve m")[0] == 2


def test_rules_table_uses_known_outcomes_and_fixes():
    from loraserve.tools.doctor import VLLM_RULES
    assert all(rule.outcome in {"not served", "refused at load", "ignored", "mis-applied"} and
               rule.fix in {"flag", "request", "merge", "convert", "retrain"} for rule in VLLM_RULES.values())
    assert "rank_alpha_pattern" not in VLLM_RULES   # vLLM 0.32 applies rank/alpha patterns per module
