"""Reading a PEFT LoRA adapter directory into plain tensors, checked against the served model.

Everything a user can get wrong about an adapter is caught here, at load time, with a message that
names the problem: a non-LoRA method, a config option whose math loraserve does not implement,
tensors for modules the served model does not have (or that PEFT itself would ignore), shapes that do
not fit, a rank above the server's cap, an adapter that changes nothing. What comes out is a
`LoRAAdapter`: per served module, the exact tensors and scaling to apply, nothing left to interpret.
"""

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file
from torch import nn


class AdapterError(Exception):
    """An adapter that cannot be applied exactly. The message is what the user reads."""


# Keys of peft 0.21.2's LoraConfig (and PeftConfig) that do not change what a trained adapter computes:
# metadata, training-time behaviour (dropout), or initialisation only (the trained tensors replace it).
HARMLESS_KEYS = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "lora_dropout", "megatron_core", "qalora_group_size", "runtime_config",
    "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
})
# Keys that change the math and that loraserve implements (each has a PEFT parity test).
IMPLEMENTED_KEYS = frozenset({
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "fan_in_fan_out", "bias", "lora_bias", "modules_to_save",
    "trainable_token_indices", "use_dora", "ensure_weight_tying",
})
# Keys that change the math and that loraserve refuses when set (to anything but their inert default).
REFUSED_KEYS = {
    "megatron_config": "Megatron tensor-parallel LoRA layers",
    "use_qalora": "QA-LoRA (quantization-aware pooled inputs)",
    "velora_config": "the VeLoRA variant",
    "alora_invocation_tokens": "Activated LoRA (aLoRA): the adapter switches on only after invocation tokens",
    "monteclora_config": "the MonteCLoRA variant",
    "layer_replication": "layer replication (the adapter expects a deeper model with repeated layers)",
    "target_parameters": "LoRA on raw parameters (target_parameters, e.g. MoE experts)",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "arrow_config": "Arrow routing",
    "kasa_config": "the KaSA variant (it also truncates the base weights)",
}
# init_lora_weights values that only initialise the trained tensors; others rewrite the base weights
# (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA: the adapter is relative to a modified base) or switch on a variant.
PURE_INITS = (True, False, "gaussian", "eva", "orthogonal")

PREFIX = "base_model.model."


@dataclass
class ModuleDelta:
    """Everything one adapter changes in one served module (a Linear or an Embedding).

    `lora_a`/`lora_b` follow PEFT's layout: Linear A [r, in], B [out, r]; Embedding A [r, num_embeddings],
    B [dim, r]. `bias` and `full_weight`/`full_bias` replace the base's (PEFT's bias="all"/"lora_only"
    and modules_to_save); `token_indices`/`token_values` replace embedding rows (trainable tokens)."""
    rank: int = 0
    alpha: float = 0.0
    scaling: float = 0.0
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    lora_bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    full_weight: torch.Tensor | None = None
    full_bias: torch.Tensor | None = None
    token_indices: torch.Tensor | None = None
    token_values: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.lora_a, self.lora_b, self.lora_bias, self.magnitude, self.bias,
                            self.full_weight, self.full_bias, self.token_values) if t is not None]


@dataclass
class LoRAAdapter:
    """A validated adapter: per served module name, what to apply. Tensors are on CPU in file dtype."""
    name: str
    path: str
    config: dict
    modules: dict[str, ModuleDelta] = field(default_factory=dict)
    file_tensors: int = 0
    file_params: int = 0

    @property
    def max_rank(self) -> int:
        return max((d.rank for d in self.modules.values()), default=0)


def read_peft_dir(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The raw config and tensors of a PEFT adapter directory; safetensors preferred, like PEFT."""
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise AdapterError(f"{path}: no adapter_config.json (is this a PEFT adapter directory?)")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from None
    st, bin_ = os.path.join(path, "adapter_model.safetensors"), os.path.join(path, "adapter_model.bin")
    if os.path.isfile(st):
        tensors = load_file(st)
    elif os.path.isfile(bin_):
        tensors = torch.load(bin_, map_location="cpu", weights_only=True)
    else:
        raise AdapterError(f"{path}: no adapter_model.safetensors or adapter_model.bin")
    return config, tensors


def check_config(config: dict) -> LoraConfig:
    """Refuse, by name, every method and option whose math loraserve does not implement."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"adapter is a {peft_type} adapter (peft_type={peft_type!r}); loraserve serves only "
                           "LoRA adapters (peft_type 'LORA')")
    for key, value in config.items():
        if key in HARMLESS_KEYS or key in IMPLEMENTED_KEYS:
            continue
        if key in REFUSED_KEYS:
            if value not in (None, False, [], {}):
                raise AdapterError(f"adapter_config sets {key}={value!r}: {REFUSED_KEYS[key]} is not supported "
                                   "by loraserve")
        elif value not in (None, False, [], {}):
            raise AdapterError(f"adapter_config has an option loraserve does not know: {key}={value!r}; "
                               "refusing rather than guessing whether it changes the output")
    init = config.get("init_lora_weights", True)
    if init not in PURE_INITS:
        raise AdapterError(f"adapter_config sets init_lora_weights={init!r}: such adapters are relative to "
                           "modified base weights or use a LoRA variant; convert it to a plain LoRA first "
                           "(PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise AdapterError(f"adapter_config sets bias={config['bias']!r}: expected 'none', 'all' or 'lora_only'")
    known = {k: v for k, v in config.items() if k in IMPLEMENTED_KEYS or k == "task_type"}
    try:
        return LoraConfig(**known)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"adapter_config is inconsistent: {e}") from None


def _served_name(name: str, served: dict[str, nn.Module], text_only: bool) -> str | None:
    """The served module a training-time module name refers to. Multimodal checkpoints (Gemma 3/4, ...)
    put the text model under `language_model`; on a text-only served model that segment is dropped."""
    if name in served:
        return name
    if text_only:
        mapped = re.sub(r"(^|\.)language_model\.", r"\1", name)
        if mapped in served:
            return mapped
    return None


# (suffix in the saved state dict, field of ModuleDelta)
_SUFFIXES = (
    (".lora_A.weight", "lora_a"), (".lora_B.weight", "lora_b"), (".lora_B.bias", "lora_bias"),
    (".lora_embedding_A", "lora_a"), (".lora_embedding_B", "lora_b"),
    (".lora_magnitude_vector.weight", "magnitude"), (".lora_magnitude_vector", "magnitude"),
    (".token_adapter.trainable_tokens_delta", "token_values"),
    (".base_layer.weight", "base_weight"), (".base_layer.bias", "bias"),
    (".weight", "weight"), (".bias", "bias"),
)


def split_key(key: str) -> tuple[str, str]:
    """A saved tensor name -> (module name, the ModuleDelta field it fills, or "unknown")."""
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for suffix, what in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], what
    return name, "unknown"


def _is_listed(name: str, modules: list[str] | None) -> bool:
    """Whether modules_to_save copies `name`: PEFT matches a plain name suffix ("norm" covers "input_layernorm")."""
    return bool(modules) and any(name.endswith(m) for m in modules)


def build_adapter(name: str, path: str, config: dict, tensors: dict[str, torch.Tensor], model: nn.Module,
                  max_lora_rank: int | None = None) -> LoRAAdapter:
    """Validate an adapter against the served model and resolve it into per-module deltas."""
    cfg = check_config(config)
    served = served_modules(model)
    text_only = not any("language_model" in n.split(".") for n in served)
    output_emb = _unwrap(model.get_output_embeddings())
    modules_to_save = list(cfg.modules_to_save or [])

    groups: dict[str, dict[str, torch.Tensor]] = {}
    keys_of: dict[str, list[str]] = {}
    unmapped, unknown = [], []
    for key, t in tensors.items():
        mod, what = split_key(key)
        if what == "unknown":
            unknown.append(key)
            continue
        target = _served_name(mod, served, text_only)
        if target is None:
            unmapped.append(key)
            continue
        groups.setdefault(mod, {})[what] = t
        keys_of.setdefault(mod, []).append(key)
    if unknown:
        raise AdapterError(f"adapter has tensors loraserve cannot interpret: {_fmt(unknown)}")
    if unmapped:
        raise AdapterError(f"adapter has {len(unmapped)} tensor(s) for modules the served model does not have "
                           f"(trained for another model?): {_fmt(unmapped)}")

    adapter = LoRAAdapter(name=name, path=path, config=config, file_tensors=len(tensors),
                          file_params=sum(t.numel() for t in tensors.values()))
    not_targeted = []
    for mod, parts in groups.items():
        target = _served_name(mod, served, text_only)
        base = served[target]
        if not isinstance(base, (nn.Linear, nn.Embedding)) and parts.keys() - {"bias"}:
            why = "modules_to_save names" if _is_listed(mod, modules_to_save) else "adapter changes"
            raise AdapterError(f"{why} module {mod!r}, a {type(base).__name__}; loraserve applies adapters "
                               "and per-adapter module copies to Linear and Embedding modules only")
        delta = ModuleDelta()
        has_lora = bool(parts.keys() & {"lora_a", "lora_b", "lora_bias", "magnitude"})
        if has_lora:
            if not _config_targets(cfg, mod, base, output_emb):
                not_targeted.extend(keys_of[mod])
                continue
            _resolve_lora(cfg, mod, base, parts, delta, max_lora_rank)
        if "token_values" in parts:
            _resolve_tokens(cfg, mod, base, parts["token_values"], delta)
        for what in ("weight", "bias", "base_weight"):
            if what in parts:
                _resolve_full(cfg, mod, base, what, parts[what], delta, modules_to_save, has_lora)
        adapter.modules[target] = delta
    if not_targeted:
        raise AdapterError(f"adapter has LoRA tensors for modules its adapter_config does not target "
                           f"(PEFT would silently ignore them): {_fmt(not_targeted)}")
    adapter.modules = {k: d for k, d in adapter.modules.items() if d.tensors()}
    _tie_tokens(adapter, model, served)
    for mod, d in adapter.modules.items():
        if d.token_indices is not None and (d.lora_a is not None or d.full_weight is not None):
            raise AdapterError(f"module {mod!r} has both trainable tokens and LoRA or a full copy "
                               "(modules_to_save); loraserve does not combine them")
    if cfg.ensure_weight_tying and _touches_embeddings(adapter, model):
        raise AdapterError("adapter_config sets ensure_weight_tying=true on embedding/lm_head changes; "
                           "loraserve does not implement tied adapter weights")
    if all(_is_noop(d, served[m]) for m, d in adapter.modules.items()):
        raise AdapterError("this adapter changes nothing: every lora_B is zero (saved before training?) "
                           "and it carries no other change")
    return adapter


def _config_targets(cfg: LoraConfig, mod: str, base: nn.Module, output_emb: nn.Module | None) -> bool:
    if isinstance(cfg.target_modules, str) and cfg.target_modules.lower() == "all-linear":
        return isinstance(base, nn.Linear) and base is not output_emb
    return bool(check_target_module_exists(cfg, mod))  # falsy for exclude_modules and modules_to_save


def _resolve_lora(cfg: LoraConfig, mod: str, base: nn.Module, parts: dict, delta: ModuleDelta,
                  max_lora_rank: int | None) -> None:
    a, b = parts.get("lora_a"), parts.get("lora_b")
    if a is None or b is None:
        raise AdapterError(f"module {mod!r} has only one of its LoRA A/B tensors")
    rank = int(a.shape[0])
    expected = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), mod), cfg.r)
    alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), mod), cfg.lora_alpha)
    if isinstance(base, nn.Linear):
        fits = a.shape == (rank, base.in_features) and b.shape == (base.out_features, rank)
        want = f"A [r, {base.in_features}] and B [{base.out_features}, r]"
    else:
        fits = a.shape == (rank, base.num_embeddings) and b.shape == (base.embedding_dim, rank)
        want = f"A [r, {base.num_embeddings}] and B [{base.embedding_dim}, r]"
    if not fits:
        raise AdapterError(f"module {mod!r}: LoRA shapes A {list(a.shape)} and B {list(b.shape)} do not fit the "
                           f"served model, which needs {want} (adapter trained for another base model?)")
    if rank != expected:
        raise AdapterError(f"module {mod!r}: LoRA rank {rank} in the weights but {expected} in adapter_config")
    if max_lora_rank is not None and rank > max_lora_rank:
        raise AdapterError(f"module {mod!r} has LoRA rank {rank}, above this server's max_lora_rank "
                           f"{max_lora_rank}; raise --max-lora-rank to at least {rank} (loraserve never clips)")
    if "magnitude" in parts:
        if not cfg.use_dora or not isinstance(base, nn.Linear):
            raise AdapterError(f"module {mod!r}: DoRA magnitude found but loraserve applies DoRA only to Linear "
                               "modules of adapters with use_dora=true")
        if cfg.bias != "none":
            raise AdapterError(f"adapter_config combines use_dora with bias={cfg.bias!r}; not supported")
        delta.magnitude = parts["magnitude"]
    elif cfg.use_dora:
        raise AdapterError(f"adapter_config sets use_dora=true but module {mod!r} has no DoRA magnitude "
                           "(loraserve applies DoRA to Linear modules only)")
    if "lora_bias" in parts:
        delta.lora_bias = parts["lora_bias"]
    delta.rank, delta.alpha, delta.lora_a, delta.lora_b = rank, float(alpha), a, b
    delta.scaling = alpha / math.sqrt(rank) if cfg.use_rslora else alpha / rank


def _resolve_tokens(cfg: LoraConfig, mod: str, base: nn.Module, values: torch.Tensor, delta: ModuleDelta) -> None:
    spec = cfg.trainable_token_indices
    if isinstance(spec, dict):
        indices = next((v for k, v in spec.items() if re.match(rf"(^|.*\.){k}$", mod)), None)
    else:
        indices = spec
    if indices is None or not isinstance(base, nn.Embedding):
        raise AdapterError(f"module {mod!r} has trainable-token values but adapter_config's "
                           "trainable_token_indices does not name it as an embedding")
    idx = torch.tensor(list(indices), dtype=torch.long)
    if values.shape != (len(indices), base.embedding_dim) or (idx >= base.num_embeddings).any():
        raise AdapterError(f"module {mod!r}: trainable tokens {list(values.shape)} for indices {indices} do not "
                           f"fit the served embedding [{base.num_embeddings}, {base.embedding_dim}]")
    delta.token_indices, delta.token_values = idx, values


def _resolve_full(cfg: LoraConfig, mod: str, base: nn.Module, what: str, t: torch.Tensor, delta: ModuleDelta,
                  modules_to_save: list[str], has_lora: bool) -> None:
    ref = base.bias if what == "bias" else base.weight
    if ref is None or t.shape != ref.shape:
        shape = None if ref is None else list(ref.shape)
        raise AdapterError(f"module {mod!r}: adapter {what.replace('base_', '')} {list(t.shape)} does not fit the "
                           f"served model's {shape} (resized vocabulary or another base model?)")
    same = torch.equal(t.to(ref.dtype), ref.detach().cpu())
    listed = _is_listed(mod, modules_to_save)
    if what == "bias" and (cfg.bias != "none" or listed):
        if same:
            return
        if not isinstance(base, nn.Linear):
            raise AdapterError(f"adapter changes the bias of {mod!r}, a {type(base).__name__}; loraserve "
                               "applies bias changes (bias='all'/'lora_only') to Linear modules only")
        if listed:
            delta.full_bias = t
        else:
            delta.bias = t
    elif what == "weight" and listed and not has_lora:
        delta.full_weight = t
    elif not same:
        raise AdapterError(f"adapter carries its own base {what.replace('base_', '')} for {mod!r} that differs "
                           "from the served model's (trained on another or resized base model?)")


def _unwrap(module: nn.Module | None) -> nn.Module | None:
    """The base module behind a wrapper that keeps it as `base_layer` (loraserve's and PEFT's layers)."""
    return getattr(module, "base_layer", module)


def served_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The served model's modules by name, as the base model has them (multi-LoRA wrappers seen through)."""
    return {n: _unwrap(m) for n, m in model.named_modules() if not n.endswith(".base_layer")}


def _tie_tokens(adapter: LoRAAdapter, model: nn.Module, served: dict[str, nn.Module]) -> None:
    """With tied embeddings PEFT applies trainable tokens to the output layer's rows too."""
    emb_in, emb_out = _unwrap(model.get_input_embeddings()), _unwrap(model.get_output_embeddings())
    if emb_out is None or emb_in is None or emb_out.weight is not emb_in.weight:
        return
    name_in = next(n for n, m in served.items() if m is emb_in)
    name_out = next(n for n, m in served.items() if m is emb_out)
    d_in = adapter.modules.get(name_in)
    if d_in is None or d_in.token_indices is None:
        return
    d_out = adapter.modules.setdefault(name_out, ModuleDelta())
    d_out.token_indices, d_out.token_values = d_in.token_indices, d_in.token_values


def _touches_embeddings(adapter: LoRAAdapter, model: nn.Module) -> bool:
    emb = {id(_unwrap(model.get_input_embeddings())), id(_unwrap(model.get_output_embeddings()))}
    served = served_modules(model)
    return any(id(served[m]) in emb for m in adapter.modules)


def _is_noop(d: ModuleDelta, base: nn.Module) -> bool:
    def same(t: torch.Tensor | None, ref: torch.Tensor | None) -> bool:
        return t is None or (ref is not None and torch.equal(t.to(ref.dtype), ref.detach().cpu()))
    lora_noop = d.lora_b is None or (not d.lora_b.any() and d.magnitude is None)
    return (lora_noop and (d.lora_bias is None or not d.lora_bias.any()) and same(d.bias, base.bias if
            isinstance(base, nn.Linear) else None) and same(d.full_weight, base.weight)
            and same(d.full_bias, getattr(base, "bias", None))
            and (d.token_values is None or same(d.token_values, base.weight[d.token_indices])))


def _fmt(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_adapter(name: str, path: str, model: nn.Module, max_lora_rank: int | None = None) -> LoRAAdapter:
    """Read and validate a PEFT adapter directory against the served model (see `build_adapter`)."""
    config, tensors = read_peft_dir(path)
    try:
        return build_adapter(name, path, config, tensors, model, max_lora_rank)
    except AdapterError as e:
        raise AdapterError(f"adapter {name!r} ({path}): {e}") from None
