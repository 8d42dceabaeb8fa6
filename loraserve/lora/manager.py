"""How adapters are found, loaded and placed, in three tiers (S-LoRA / vLLM style):

- registered: every adapter the server serves, by name -> its directory and its load report;
- host memory: up to `max_cpu_loras` validated adapters, least recently used evicted first; a miss
  re-reads and re-validates the directory, and refuses it if its files changed since the first load
  (a request must never continue with other weights than it started with);
- device slots: `max_loras` slots that the multi-LoRA layers index, least recently used evicted first.

The engine calls `use(key)` when a request naming an adapter arrives and `done(key)` when it ends,
`activate(key)` when one of its sequences is scheduled (the returned slot goes into the per-token slot
tensor) and `release(key)` when it stops running. An activated adapter is pinned: neither its slot
nor its host copy is evicted while a running sequence needs it.

Unloading removes the name at once (new requests no longer find it) but keeps the weights of an
adapter still in use until its last request is done. Each load gets its own key, the adapter's name
unless an unloaded adapter of that name is still finishing requests: then the old requests keep the
old weights and new requests get the new ones.

State is changed by one thread (the engine loop). `resolve`, `names` and `served` read an immutable
snapshot, so the HTTP thread may call them.
"""

import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch import nn

from loraserve.lora.adapter import AdapterError, LoRAAdapter, load_adapter
from loraserve.lora.fused import link_projection_groups
from loraserve.lora.layers import MultiLoRAEmbedding, MultiLoRALinear, _MultiLoRA
from loraserve.model.arena import HugePageArena, hugepages_supported

# Separates a name from the load number in the key of a re-used name; names may not contain it.
KEY_SEP = "\x00"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


class AdapterConflict(AdapterError):
    """A load under a name that is taken (by another adapter, or by the base model)."""


class AdapterNotFound(AdapterError):
    """No served adapter has this name."""


class AdapterChanged(AdapterError):
    """An adapter evicted from host memory whose files changed (or vanished) since it was loaded."""


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
    # Measured effect: KL(adapter || base) of the next-token distribution on the engine's probe prompt.
    next_token_kl: float | None = None

    def summary(self) -> str:
        mods = ", ".join(f"{k} x{v}" for k, v in sorted(self.modules_by_type.items()))
        extra = f"; {', '.join(self.features)}" if self.features else ""
        if self.next_token_kl is not None:
            extra += f"; next-token KL vs base {self.next_token_kl:.4g}"
        return (f"{self.name}: rank {'/'.join(map(str, self.ranks))}, alpha "
                f"{'/'.join(f'{a:g}' for a in self.alphas)}, {self.num_params:,} params in {self.num_tensors} "
                f"tensors over {mods}{extra} ({self.load_seconds * 1000:.0f} ms)")


@dataclass
class _Entry:
    """One loaded adapter: where it lives on disk and who uses it."""
    key: str
    name: str
    path: str
    stamp: tuple                    # sizes and mtimes of its files when first read
    users: int = 0                  # engine requests naming it, waiting or running
    served: bool = True             # False once unloaded: kept only until its last user is done


LoadListener = Callable[[str, float | None], None]   # (kind "load" | "reload", seconds or None if it failed)


class LoRAManager:
    """One served model, `max_loras` device slots, `max_cpu_loras` adapters in host memory (None: no
    limit), any number of registered adapters.

    `max_lora_rank` is a refusal threshold, never a clip: an adapter above it fails to load."""

    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 max_cpu_loras: int | None = None, kernel: object | None = None, deltas_beside: bool = False) -> None:
        """`kernel`: the C++ multi-LoRA kernel (model.kernels.multi_lora()) for the projection groups, or
        None to apply LoRA with PyTorch matmuls; `deltas_beside`: the kernel's deltas run on its helper
        thread while the base GEMM runs (lora/fused.py)."""
        if max_loras < 1:
            raise ValueError("max_loras must be at least 1")
        if max_cpu_loras is not None and max_cpu_loras < max_loras:
            # Every adapter pinned in a slot stays in host memory too; fewer would leave no room.
            raise ValueError(f"max_cpu_loras ({max_cpu_loras}) must be at least max_loras ({max_loras})")
        param = next(model.parameters())
        self.model = model
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.max_lora_rank = max_lora_rank
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = dtype or param.dtype
        self.layers: dict[str, _MultiLoRA] = {}
        self.entries: dict[str, _Entry] = {}                        # by key, unloaded-but-in-use included
        self.adapters: OrderedDict[str, LoRAAdapter] = OrderedDict()  # host tier by key, LRU first
        self.reports: dict[str, LoadReport] = {}                    # by key
        self.slot_owner: list[str | None] = [None] * max_loras
        self.pins: Counter[str] = Counter()
        self.on_load: LoadListener | None = None
        self._served: dict[str, _Entry] = {}                       # by name; replaced, never mutated
        self._recent: OrderedDict[int, None] = OrderedDict()  # resident slots, least recently used first
        self._loads = 0
        self.kernel = kernel
        self.deltas_beside = deltas_beside and kernel is not None
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
        # The kernel streams the adapters from memory every step: keep them on huge pages (model/arena.py).
        arena = HugePageArena() if self.kernel is not None and hugepages_supported() else None
        self.groups = link_projection_groups(model, self.kernel, arena, self.deltas_beside)
        for group in self.groups:
            group.prepare()
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(head, MultiLoRALinear):
            model.register_forward_pre_hook(partial(_note_kept_tokens, head), with_kwargs=True)
        return len(targets)

    # ---- registry ----

    def load(self, name: str, path: str) -> LoadReport:
        """Read and validate an adapter (raises AdapterError naming the problem) and serve it as `name`."""
        if not name or any(not c.isprintable() for c in name):
            raise AdapterError(f"adapter name {name!r} is empty or has control characters")
        if name in self._served:
            raise AdapterConflict(f"an adapter named {name!r} is already loaded (from {self._served[name].path})")
        key = name if name not in self.entries else f"{name}{KEY_SEP}{self._loads}"
        self._loads += 1
        start = time.perf_counter()
        stamp = _stamp(path)
        try:
            adapter = self._read(name, path)
        except AdapterError:
            self._notify("load", None)
            raise
        seconds = time.perf_counter() - start
        self.entries[key] = entry = _Entry(key, name, path, stamp)
        self.reports[key] = report = _report(adapter, seconds)
        self._admit(key, adapter)
        self._served = {**self._served, name: entry}
        self._notify("load", seconds)
        return report

    def unload(self, name: str) -> int:
        """Stop serving `name`; returns how many requests still use it. Their sequences keep its
        weights (slot and host copy) until the last one is done; then everything of it is freed."""
        key = self.resolve(name)
        if key is None:
            raise AdapterNotFound(self._not_found(name))
        entry = self.entries[key]
        if entry.users and key not in self.adapters:
            # Its requests may outlive its directory (users delete what they unloaded): hold it in memory.
            try:
                self._host(key)
            except AdapterChanged:
                pass    # those requests fail with this same message when they are scheduled
        self._served = {n: e for n, e in self._served.items() if n != name}
        entry.served = False
        self._purge_if_unused(key)
        return entry.users

    def resolve(self, name: str) -> str | None:
        """The key of the adapter served as `name`, or None. Safe from any thread."""
        entry = self._served.get(name)
        return None if entry is None else entry.key

    def names(self) -> list[str]:
        """Served adapter names. Safe from any thread."""
        return sorted(self._served)

    def served(self) -> dict[str, str]:
        """Served adapter name -> its directory. Safe from any thread."""
        return {name: entry.path for name, entry in self._served.items()}

    @staticmethod
    def name_of(key: str) -> str:
        return key.partition(KEY_SEP)[0]

    def status(self, key: str) -> dict:
        """The load report plus where the adapter sits now, for the adapters API."""
        entry = self.entries[key]
        slot = self.slot_of(key)
        tier = "device" if slot is not None else "host" if key in self.adapters else "disk"
        return {**asdict(self.reports[key]), "tier": tier, "slot": slot, "requests": entry.users,
                "unloading": not entry.served}

    # ---- requests ----

    def use(self, key: str) -> None:
        """A request naming this adapter entered the engine (waiting or running)."""
        self.entries[key].users += 1

    def done(self, key: str) -> None:
        """That request ended (finished or aborted); an unloaded adapter goes with its last user."""
        entry = self.entries[key]
        if entry.users <= 0:
            raise ValueError(f"adapter {entry.name!r} done more often than used")
        entry.users -= 1
        self._purge_if_unused(key)

    def activate(self, key: str) -> int:
        """Make the adapter resident in a device slot and pin it for one more user; returns the slot."""
        self._entry(key)
        slot = self.slot_of(key)
        if slot is None:
            adapter = self._host(key)
            slot = self._free_slot()
            for mod, layer in self.layers.items():
                layer.set_slot(slot, adapter.modules.get(mod))
            self.slot_owner[slot] = key
        elif key in self.adapters:
            self.adapters.move_to_end(key)
        self._recent[slot] = None
        self._recent.move_to_end(slot)
        self.pins[key] += 1
        return slot

    def try_activate(self, key: str) -> int | None:
        """`activate`, or None when every slot is pinned by running sequences (the scheduler waits).
        Raises AdapterChanged if the adapter must be re-read and its files changed."""
        self._entry(key)
        if self.slot_of(key) is None and None not in self.slot_owner and all(self.pins[k] for k in self.slot_owner):
            return None
        return self.activate(key)

    def release(self, key: str) -> None:
        """One user of the slot is done; at zero users it may be reused (it stays warm until then)."""
        if self.pins[key] <= 0:
            raise ValueError(f"adapter {self.name_of(key)!r} released more often than activated")
        self.pins[key] -= 1
        self._purge_if_unused(key)

    def slot_of(self, key: str) -> int | None:
        return self.slot_owner.index(key) if key in self.slot_owner else None

    # ---- tiers ----

    def _entry(self, key: str) -> _Entry:
        if key not in self.entries:
            raise AdapterNotFound(self._not_found(key))
        return self.entries[key]

    def _not_found(self, name: str) -> str:
        known = ", ".join(self.names()) or "none"
        return f"no adapter named {name!r} is loaded (loaded: {known})"

    def _read(self, name: str, path: str) -> LoRAAdapter:
        try:
            adapter = load_adapter(name, path, self.model, self.max_lora_rank)
        except AdapterError:
            raise
        except Exception as e:   # a corrupt file: the parsers raise their own types
            raise AdapterError(f"adapter {name!r} ({path}) could not be read: {type(e).__name__}: {e}") from e
        for delta in adapter.modules.values():
            for f in ("lora_a", "lora_b", "lora_bias", "magnitude", "bias", "full_weight", "full_bias",
                      "token_values"):
                t = getattr(delta, f)
                if t is not None:
                    setattr(delta, f, t.to(self.dtype))
        return adapter

    def _host(self, key: str) -> LoRAAdapter:
        """The adapter's validated tensors, re-read from disk if they were evicted from host memory."""
        if key in self.adapters:
            self.adapters.move_to_end(key)
            return self.adapters[key]
        entry = self.entries[key]
        start = time.perf_counter()
        try:
            if _stamp(entry.path) != entry.stamp:
                raise AdapterChanged(f"adapter {entry.name!r} ({entry.path}) changed on disk since it was loaded; "
                                     "loraserve will not serve other weights under the same load: unload it and "
                                     "load it again")
            adapter = self._read(entry.name, entry.path)
        except AdapterError:
            self._notify("reload", None)
            raise
        self._notify("reload", time.perf_counter() - start)
        self._admit(key, adapter)
        return adapter

    def _admit(self, key: str, adapter: LoRAAdapter) -> None:
        """Keep `adapter` in host memory as the most recently used, then evict least recently used
        ones that no running sequence pins and that are still served (an unloaded adapter still in
        use stays: its directory may be gone). Only those two kinds can hold the tier above
        `max_cpu_loras`, and pinned ones are at most `max_loras`."""
        self.adapters[key] = adapter
        self.adapters.move_to_end(key)
        if self.max_cpu_loras is None:
            return
        for victim in list(self.adapters):
            if len(self.adapters) <= self.max_cpu_loras:
                break
            if not self.pins[victim] and self.entries[victim].served:
                del self.adapters[victim]

    def _purge_if_unused(self, key: str) -> None:
        entry = self.entries[key]
        if entry.served or entry.users or self.pins[key]:
            return
        slot = self.slot_of(key)
        if slot is not None:
            self._evict(slot)
        self.adapters.pop(key, None)
        self.pins.pop(key, None)
        del self.entries[key], self.reports[key]

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

    def _notify(self, kind: str, seconds: float | None) -> None:
        if self.on_load is not None:
            self.on_load(kind, seconds)


def _stamp(path: str) -> tuple:
    """Sizes and modification times of an adapter directory's files: a changed file changes it."""
    out = []
    for name in ADAPTER_FILES:
        try:
            st = os.stat(os.path.join(path, name))
        except OSError:
            continue
        out.append((name, st.st_size, st.st_mtime_ns))
    return tuple(out)


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
