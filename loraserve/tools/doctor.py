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

VLLM_RULES_VERSION = "v0.11"
VLLM_RULES_READ_FROM = (
    f"vLLM {VLLM_RULES_VERSION} (main branch, autumn 2025): vllm/config/lora.py, vllm/lora/peft_helper.py, "
    "vllm/lora/lora_model.py (from_local_checkpoint), vllm/lora/utils.py (parse_fine_tuned_lora_name, "
    "is_base_embedding_weights, get_supported_lora_modules), vllm/lora/model_manager.py, "
    "vllm/model_executor/models/{llama,qwen2,qwen3,gemma3}.py")
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)   # LoRAConfig.max_lora_rank's Literal
VLLM_DEFAULT_MAX_LORA_RANK = 16
# Architectures whose vLLM model class declares `embedding_modules`, the only ones that take LoRA on
# embed_tokens / lm_head (Gemma3ForCausalLM declares none).
VLLM_EMBEDDING_LORA_ARCHS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                       "Qwen3ForCausalLM"})


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
        "without --enable-lora no adapter is loaded: a request naming the adapter is a 404, one naming the "
        "base gets base output", "not served", "flag"),
    "not_registered": Rule(
        "only adapters in --lora-modules (or loaded at run time through /v1/load_lora_adapter when "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) are model names", "not served", "flag"),
    "request_names_base": Rule(
        "a request whose `model` is the base's served name gets the base model, with no error", "ignored",
        "request"),
    "request_name_unknown": Rule(
        "a request whose `model` is neither the base nor a registered adapter is a 404", "not served", "request"),
    "rank_over_cap": Rule(
        "PEFTHelper.validate_legal refuses r above --max-lora-rank (default 16, allowed "
        f"{', '.join(map(str, VLLM_MAX_LORA_RANKS))}); an adapter in --lora-modules stops the server starting",
        "refused at load", "flag"),
    "rank_over_vllm_max": Rule(
        f"no --max-lora-rank above {VLLM_MAX_LORA_RANKS[-1]} exists", "refused at load", "merge"),
    "modules_to_save": Rule(
        "validate_legal: 'vLLM only supports modules_to_save being None'", "refused at load", "merge"),
    "dora": Rule("validate_legal: 'vLLM does not yet support DoRA'", "refused at load", "merge"),
    "bias": Rule("validate_legal refuses bias other than 'none'", "refused at load", "merge"),
    "lora_bias": Rule(
        "lora_B.bias is not a LoRA weight parse_fine_tuned_lora_name accepts", "refused at load", "merge"),
    "trainable_tokens": Rule(
        "token_adapter.trainable_tokens_delta is not a LoRA weight parse_fine_tuned_lora_name accepts",
        "refused at load", "merge"),
    "embedding_lora": Rule(
        "LoRA on embed_tokens / lm_head is taken only by model classes that declare embedding_modules "
        f"({', '.join(sorted(VLLM_EMBEDDING_LORA_ARCHS))}); elsewhere the module is not in the expected set",
        "refused at load", "merge"),
    "base_embedding_copy": Rule(
        "tensors ending .embed_tokens.base_layer.weight / .lm_head.base_layer.weight are skipped "
        "(is_base_embedding_weights): a resized or retrained embedding saved in them is dropped", "ignored",
        "merge"),
    "rank_alpha_pattern": Rule(
        "PEFTHelper keeps only r and lora_alpha: every module is scaled by lora_alpha/r, so modules under "
        "rank_pattern / alpha_pattern get the wrong scale", "mis-applied", "merge"),
    "modified_base_init": Rule(
        "init_lora_weights PiSSA / OLoRA / CorDA / LoftQ adapters are relative to modified base weights; "
        "vLLM adds them to the unmodified base", "mis-applied", "convert"),
    "language_model_prefix": Rule(
        "at load only the last part of each module name is checked, so tensors named ...language_model... "
        "load on a text-only model and then match no module: nothing is applied", "ignored", "merge"),
    "untrained": Rule("every lora_B is zero: the adapter is served and changes nothing", "ignored", "retrain"),
}
_MODIFIED_BASE_INITS = ("pissa", "olora", "corda", "loftq")


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
    try:
        ns, _ = p.parse_known_args(args)
        modules = [parse_lora_module(spec)[:2] for spec in ns.lora_modules]
    except (argparse.ArgumentError, LoRAModulesError) as err:
        raise UsageError(f"cannot read the vLLM command's flags: {err}") from None
    model = positional_model or ns.model
    if model is None:
        raise UsageError("the launch command names no model (vllm serve MODEL, or --model MODEL)")
    runtime = env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true")
    return Launch(tokens=tokens, model=model, served_names=ns.served_model_name or [model],
                  enable_lora=ns.enable_lora, lora_modules=modules, max_lora_rank=ns.max_lora_rank,
                  runtime_loading=runtime)


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
        add(Finding("lora_disabled", "the command has no --enable-lora"))
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

    # The adapter itself, against vLLM's loader.
    ranks = [int(r) for r in info["ranks"]] or [int(config.get("r", 0))]
    rank = max(ranks + list((config.get("rank_pattern") or {}).values()))
    if rank > VLLM_MAX_LORA_RANKS[-1]:
        add(Finding("rank_over_vllm_max", f"rank {rank}"))
    elif rank > launch.max_lora_rank:
        add(Finding("rank_over_cap", f"rank {rank} > --max-lora-rank {launch.max_lora_rank}"))
    if config.get("modules_to_save"):
        add(Finding("modules_to_save", f"modules_to_save={config['modules_to_save']}"))
    if config.get("use_dora"):
        add(Finding("dora", "use_dora=true"))
    if config.get("bias", "none") != "none":
        add(Finding("bias", f"bias={config['bias']!r}"))
    if info["other_parts"].get("lora_bias"):
        add(Finding("lora_bias", f"lora_B.bias on {len(info['other_parts']['lora_bias'])} module(s)"))
    if info["other_parts"].get("trainable_tokens"):
        add(Finding("trainable_tokens", f"trainable tokens on {', '.join(info['other_parts']['trainable_tokens'])}"))
    emb = sorted(m for m in info["modules"] if m.rpartition(".")[2] in ("embed_tokens", "lm_head")
                 and "rank" in info["modules"][m])
    if emb and arch not in VLLM_EMBEDDING_LORA_ARCHS:
        add(Finding("embedding_lora", f"LoRA on {', '.join(emb)}; the served architecture is "
                                      f"{arch or 'unknown (not a local model directory)'}", certain=arch is not None))
    if info["other_parts"].get("base_copy"):
        add(Finding("base_embedding_copy", f"{', '.join(info['other_parts']['base_copy'])} carry full base "
                                           "weights; harmless only if they equal the served model's",
                    certain=False))
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        add(Finding("rank_alpha_pattern", f"rank_pattern={config.get('rank_pattern') or {}}, "
                                          f"alpha_pattern={config.get('alpha_pattern') or {}}"))
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_MODIFIED_BASE_INITS):
        add(Finding("modified_base_init", f"init_lora_weights={init!r}"))
    if info["language_model_prefix"] and text_only is not False:
        add(Finding("language_model_prefix", f"tensors are named ...language_model... but {launch.model} is "
                                             + ("a text-only model" if text_only else "possibly text-only"),
                    certain=bool(text_only)))
    if info["untrained"]:
        add(Finding("untrained", f"lora_B zero in {info['lora_b_zero']} modules"))

    return _advice(adapter, launch, name, rank, findings)


def _advice(adapter: str, launch: Launch, name: str, rank: int, findings: list[Finding]) -> dict:
    fixes = {VLLM_RULES[f.rule].fix for f in findings}
    corrected = None
    if fixes & {"flag"}:
        corrected = _corrected_tokens(launch, adapter, name, rank)
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


def _corrected_tokens(launch: Launch, adapter: str, name: str, rank: int) -> list[str]:
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
    if any(f["fix"] == "retrain" for f in r["findings"]):
        lines.append("the adapter file holds no trained change: save it again after training")
    lines.append(f"requests should send model={r['request_model_name']!r}")
    lines.append(f"(vLLM's rules as read from vLLM {VLLM_RULES_VERSION}'s source; see `--json` for the files)")
    return "\n".join(lines)
