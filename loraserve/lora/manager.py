"""How adapters are found, loaded and placed: a registry of validated adapters in host memory and
a fixed number of device slots that the multi-LoRA layers index.

The engine calls `activate(name)` when a sequence using the adapter is scheduled (the returned slot
goes into the per-token slot tensor) and `release(name)` when it finishes. An adapter in use is
pinned; unpinned resident adapters stay warm and are evicted least-recently-used first.
"""

import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from loraserve.lora.adapter import AdapterError, LoRAAdapter, load_adapter
from loraserve.lora.layers import MultiLoRAEmbedding, MultiLoRALinear, _MultiLoRA


@dataclass
class LoadReport:
    """What a loaded adapter changes, for logs, `inspect` and the load API's answer."""
    name: str
    path: str
    ranks: list[int]
    alphas: list[float]
    modules_by_type: dict[str, int]
    num_tensors: int                # in the adapter file
    num_params: int
    load_seconds: float
    features: list[str] = field(default_factory=list)  # e.g. "DoRA", "modules_to_save: lm_head"

    def summary(self) -> str:
        mods = ", ".join(f"{k} x{v}" for k, v in sorted(self.modules_by_type.items()))
        extra = f"; {', '.join(self.features)}" if self.features else ""
        return (f"{self.name}: rank {'/'.join(map(str, self.ranks))}, alpha "
                f"{'/'.join(f'{a:g}' for a in self.alphas)}, {self.num_params:,} params in {self.num_tensors} "
                f"tensors over {mods}{extra} ({self.load_seconds * 1000:.0f} ms)")


class LoRAManager:
    """One served model, `max_loras` device slots, any number of registered adapters.

    `max_lora_rank` is a refusal threshold, never a clip: an adapter above it fails to load."""

    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        if max_loras < 1:
            raise ValueError("max_loras must be at least 1")
        param = next(model.parameters())
        self.model = model
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = dtype or param.dtype
        self.layers: dict[str, _MultiLoRA] = {}
        self.adapters: dict[str, LoRAAdapter] = {}
        self.reports: dict[str, LoadReport] = {}
        self.slot_owner: list[str | None] = [None] * max_loras
        self.pins: Counter[str] = Counter()
        self._recent: OrderedDict[int, None] = OrderedDict()  # resident slots, least recently used first
        self.wrap(model)

    def wrap(self, model: nn.Module) -> int:
        """Swap every nn.Linear / nn.Embedding for its multi-LoRA version; returns how many.

        Wrappers with no adapter touching them cost one attribute check per forward."""
        targets = [(n, m) for n, m in model.named_modules()
                   if isinstance(m, (nn.Linear, nn.Embedding)) and not n.endswith(".base_layer")]
        for name, module in targets:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            cls = MultiLoRALinear if isinstance(module, nn.Linear) else MultiLoRAEmbedding
            layer = cls(module, self.max_loras).to(self.device)
            setattr(parent, attr, layer)
            self.layers[name] = layer
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(head, MultiLoRALinear):
            model.register_forward_pre_hook(partial(_note_kept_tokens, head), with_kwargs=True)
        return len(targets)

    def load(self, name: str, path: str) -> LoadReport:
        """Read and validate an adapter (raises AdapterError naming the problem) and register it."""
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded")
        start = time.perf_counter()
        adapter = load_adapter(name, path, self.model, self.max_lora_rank)
        for delta in adapter.modules.values():
            for f in ("lora_a", "lora_b", "lora_bias", "magnitude", "bias", "full_weight", "full_bias",
                      "token_values"):
                t = getattr(delta, f)
                if t is not None:
                    setattr(delta, f, t.to(self.dtype))
        self.adapters[name] = adapter
        self.reports[name] = report = _report(adapter, time.perf_counter() - start)
        return report

    def unload(self, name: str) -> None:
        """Forget an adapter; refused while a running sequence uses it."""
        self._get(name)
        if self.pins[name]:
            raise AdapterError(f"adapter {name!r} is in use by {self.pins[name]} running sequence(s)")
        slot = self.slot_of(name)
        if slot is not None:
            self._evict(slot)
        del self.adapters[name], self.reports[name]

    def activate(self, name: str) -> int:
        """Make `name` resident in a device slot and pin it for one more user; returns the slot."""
        adapter = self._get(name)
        slot = self.slot_of(name)
        if slot is None:
            slot = self._free_slot()
            for mod, layer in self.layers.items():
                layer.set_slot(slot, adapter.modules.get(mod))
            self.slot_owner[slot] = name
        self._recent[slot] = None
        self._recent.move_to_end(slot)
        self.pins[name] += 1
        return slot

    def try_activate(self, name: str) -> int | None:
        """`activate`, or None when every slot is pinned by running sequences (the scheduler waits)."""
        self._get(name)
        if self.slot_of(name) is None and None not in self.slot_owner and all(self.pins[n] for n in self.slot_owner):
            return None
        return self.activate(name)

    def release(self, name: str) -> None:
        """One user of `name` is done; at zero users its slot may be reused (it stays warm until then)."""
        if self.pins[name] <= 0:
            raise ValueError(f"adapter {name!r} released more often than activated")
        self.pins[name] -= 1

    def names(self) -> list[str]:
        return sorted(self.adapters)

    def slot_of(self, name: str) -> int | None:
        return self.slot_owner.index(name) if name in self.slot_owner else None

    def _get(self, name: str) -> LoRAAdapter:
        if name not in self.adapters:
            known = ", ".join(self.names()) or "none"
            raise AdapterError(f"no adapter named {name!r} is loaded (loaded: {known})")
        return self.adapters[name]

    def _free_slot(self) -> int:
        if None in self.slot_owner:
            return self.slot_owner.index(None)
        for slot in self._recent:  # least recently used first
            if not self.pins[self.slot_owner[slot]]:
                self._evict(slot)
                return slot
        raise AdapterError(f"all {self.max_loras} LoRA slots are in use by running sequences; "
                           "raise max_loras or wait")

    def _evict(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(slot)
        self.slot_owner[slot] = None
        self._recent.pop(slot, None)


def _note_kept_tokens(head: MultiLoRALinear, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """HF causal LMs run the output head only on the `logits_to_keep` positions; tell the head which of
    the batch's tokens those are, so each gets its own adapter slot."""
    keep = kwargs.get("logits_to_keep", 0)
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs["inputs_embeds"][..., 0]
    if isinstance(keep, int) and keep == 0:
        head.token_index = None
        return
    grid = torch.arange(ids.numel(), device=ids.device).view(ids.shape[:2])
    head.token_index = (grid[:, -keep:] if isinstance(keep, int) else grid[:, keep]).reshape(-1)


def _report(adapter: LoRAAdapter, seconds: float) -> LoadReport:
    deltas = adapter.modules.values()
    features = []
    if any(d.magnitude is not None for d in deltas):
        features.append("DoRA")
    if adapter.config.get("use_rslora"):
        features.append("rsLoRA")
    full = sorted(m for m, d in adapter.modules.items() if d.full_weight is not None)
    if full:
        features.append("modules_to_save: " + ", ".join(full))
    tokens = sorted(m for m, d in adapter.modules.items() if d.token_indices is not None)
    if tokens:
        features.append("trainable tokens: " + ", ".join(tokens))
    if any(d.bias is not None or d.lora_bias is not None for d in deltas):
        features.append("bias")
    return LoadReport(
        name=adapter.name, path=adapter.path,
        ranks=sorted({d.rank for d in deltas if d.lora_a is not None}),
        alphas=sorted({d.alpha for d in deltas if d.lora_a is not None}),
        modules_by_type=dict(Counter(m.rpartition(".")[2] for m in adapter.modules)),
        num_tensors=adapter.file_tensors, num_params=adapter.file_params, load_seconds=seconds,
        features=features)
