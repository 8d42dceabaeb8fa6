"""`loraserve inspect`: what an adapter file really contains, and with `--base`, whether it fits that
model and how much it changes it.

A PEFT directory can say one thing in adapter_config.json and carry another in its tensors (a rank
pattern, a module copy, an embedding LoRA, zero B matrices saved before training). Every later
failure (an engine that drops part of it, a merge that silently skips it) starts with not knowing
that. This reads the tensors themselves; with a base model it runs loraserve's own validation and
measures the effect with PEFT, so "it loads" and "it changes the output" are both facts."""

import argparse
import math
import sys
from collections import Counter

import torch
from peft.utils.other import get_pattern_key

from loraserve.lora.adapter import AdapterError, load_adapter, read_peft_dir, split_key
from loraserve.tools.common import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, UsageError, adapter_dir, emit
from loraserve.tools.oracle import load_base, load_peft, logits_of, probe_inputs

# What each ModuleDelta field (adapter.split_key reads PEFT's tensor names) is called in the report.
_KINDS = {"lora_a": "lora_A", "lora_b": "lora_B", "lora_bias": "lora_bias", "magnitude": "dora_magnitude",
          "token_values": "trainable_tokens", "base_weight": "base_copy", "bias": "bias", "weight": "full_weight"}
# Config keys shown when set to something other than PEFT's default.
_OPTIONS = {
    "use_rslora": False, "use_dora": False, "bias": "none", "lora_bias": False, "modules_to_save": None,
    "trainable_token_indices": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
    "layers_pattern": None, "fan_in_fan_out": False, "init_lora_weights": True, "exclude_modules": None,
    "ensure_weight_tying": False,
}
# Below this the adapter is indistinguishable from the base on the probes (float32 noise is ~1e-12).
KL_NOTHING = 1e-9


def run(args: argparse.Namespace) -> int:
    try:
        result = inspect_adapter(args.adapter, args.base)
    except UsageError as err:
        print(f"loraserve inspect: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    emit(result, args.json, _text(result))
    return EXIT_PROBLEM if result["problems"] else EXIT_OK


def inspect_adapter(path: str, base: str | None = None) -> dict:
    """Everything `inspect` reports, as a dict; `problems` lists what makes the adapter unusable."""
    adapter_dir(path)
    try:
        config, tensors = read_peft_dir(path)
    except AdapterError as err:
        return {"adapter": path, "problems": [str(err)]}
    result = describe(config, tensors)
    result["adapter"] = path
    if base is not None:
        result["base"] = base
        result.update(check_against_base(path, base))
    result["problems"] = _problems(result)
    return result


def describe(config: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The adapter as its tensors show it, with no base model needed."""
    modules: dict[str, dict] = {}
    unknown = []
    for key, t in tensors.items():
        module, field = split_key(key)
        if field not in _KINDS:
            unknown.append(key)
            continue
        modules.setdefault(module, {})[_KINDS[field]] = t
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    alpha_pattern = config.get("alpha_pattern") or {}
    per_module, zero_b, lora_b_count = {}, 0, 0
    for mod, parts in sorted(modules.items()):
        entry = {"parts": sorted(parts)}
        if "lora_A" in parts:
            rank = int(parts["lora_A"].shape[0])
            a = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), mod), alpha)
            entry.update(rank=rank, alpha=a, scaling=a / math.sqrt(rank) if config.get("use_rslora") else a / rank)
        if "lora_B" in parts:
            lora_b_count += 1
            zero_b += int(not parts["lora_B"].any())
        per_module[mod] = entry
    ranks = Counter(e["rank"] for e in per_module.values() if "rank" in e)
    alphas = Counter(e["alpha"] for e in per_module.values() if "alpha" in e)
    by_type = Counter(m.rpartition(".")[2] for m, e in per_module.items() if "rank" in e)
    others = {kind: sorted(m for m, e in per_module.items() if kind in e["parts"])
              for kind in ("dora_magnitude", "full_weight", "trainable_tokens", "bias", "lora_bias", "base_copy")}
    only_lora = all(set(e["parts"]) <= {"lora_A", "lora_B"} for e in per_module.values())
    return {
        "peft_type": config.get("peft_type"), "task_type": config.get("task_type"),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "r": r, "lora_alpha": alpha, "target_modules": config.get("target_modules"),
        "options": {k: config[k] for k, default in _OPTIONS.items() if config.get(k, default) != default},
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": {f"{k:g}": v for k, v in sorted(alphas.items())},
        "lora_modules_by_type": dict(sorted(by_type.items())),
        "other_parts": {k: v for k, v in others.items() if v},
        "num_tensors": len(tensors), "num_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "num_params": sum(t.numel() for t in tensors.values()),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "lora_b_zero": f"{zero_b}/{lora_b_count}",
        "untrained": lora_b_count > 0 and zero_b == lora_b_count and only_lora,
        "language_model_prefix": any("language_model" in m.split(".") for m in modules),
        "unknown_tensors": sorted(unknown), "modules": per_module,
    }


def check_against_base(path: str, base: str) -> dict:
    """loraserve's validation against `base`, then the measured next-token KL(adapter || base)."""
    model, tokenizer = load_base(base)
    try:
        load_adapter("adapter", path, model)
    except AdapterError as err:
        return {"fits_base": False, "fit_error": str(err)}
    inputs = probe_inputs(tokenizer, model.config.get_text_config().vocab_size)
    base_last = [lg[-1] for lg in logits_of(model, inputs)]
    adapted_last = [lg[-1] for lg in logits_of(load_peft(model, path), inputs)]
    kls, changed = [], 0
    for a, b in zip(adapted_last, base_last):
        la, lb = a.log_softmax(-1), b.log_softmax(-1)
        kls.append(float((la.exp() * (la - lb)).sum()))
        changed += int(a.argmax() != b.argmax())
    return {"fits_base": True, "effect": {"probes": len(inputs), "kl_mean": sum(kls) / len(kls), "kl_max": max(kls),
                                          "next_token_changed": changed}}


def _problems(r: dict) -> list[str]:
    problems = []
    if r["unknown_tensors"]:
        problems.append(f"tensors PEFT would not load as LoRA: {', '.join(r['unknown_tensors'][:8])}")
    if r["untrained"]:
        problems.append(f"untrained: every lora_B is zero ({r['lora_b_zero']}), so it changes nothing "
                        "(saved before training, or the trained weights were not saved)")
    if r.get("fits_base") is False:
        problems.append(f"loraserve refuses it on this base: {r['fit_error']}")
    effect = r.get("effect")
    if effect and effect["kl_max"] < KL_NOTHING:
        problems.append(f"no measurable effect on the base: next-token KL at most {effect['kl_max']:.2g} "
                        "on the probe prompts")
    return problems


def _text(r: dict) -> str:
    if "peft_type" not in r:
        return f"{r['adapter']}: " + "; ".join(r["problems"])
    lines = [f"{r['adapter']}: {r['peft_type']} adapter ({r['task_type'] or 'no task type'}), trained on "
             f"{r['base_model_name_or_path'] or 'an unnamed base'}",
             f"  r={r['r']} lora_alpha={r['lora_alpha']} target_modules={r['target_modules']}"]
    if r["options"]:
        lines.append("  options: " + ", ".join(f"{k}={v}" for k, v in r["options"].items()))
    lines.append("  ranks: " + (", ".join(f"{k} (x{v})" for k, v in r["ranks"].items()) or "none")
                 + "; alphas: " + (", ".join(f"{k} (x{v})" for k, v in r["alphas"].items()) or "none"))
    lines.append("  LoRA modules by type: "
                 + (", ".join(f"{k} x{v}" for k, v in r["lora_modules_by_type"].items()) or "none"))
    for kind, mods in r["other_parts"].items():
        lines.append(f"  {kind.replace('_', ' ')}: {', '.join(mods[:6])}" + (" ..." if len(mods) > 6 else ""))
    lines.append(f"  {r['num_tensors']} tensors, {r['num_params']:,} parameters, {r['num_bytes'] / 2**20:.2f} MiB "
                 f"({', '.join(r['dtypes'])}); lora_B all zero in {r['lora_b_zero']} modules")
    if r["language_model_prefix"]:
        lines.append("  tensor names carry a multimodal `language_model` prefix")
    if "fits_base" in r:
        lines.append(f"  against {r['base']}: " + ("every tensor maps onto a module of the base, shapes included"
                                                    if r["fits_base"] else "refused (see PROBLEM)"))
    if r.get("effect"):
        e = r["effect"]
        lines.append(f"  effect: next-token KL(adapter || base) mean {e['kl_mean']:.4g}, max {e['kl_max']:.4g} "
                     f"over {e['probes']} probes; the top token changes on {e['next_token_changed']}")
    lines.extend(f"PROBLEM: {p}" for p in r["problems"])
    return "\n".join(lines)
