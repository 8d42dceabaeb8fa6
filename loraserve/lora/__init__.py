"""LoRA adapters: reading and validating PEFT adapter directories (adapter.py), the slot-indexed
multi-LoRA layers (layers.py), and the registry that places adapters in device slots (manager.py)."""

from loraserve.lora.adapter import AdapterError, LoRAAdapter, ModuleDelta, load_adapter
from loraserve.lora.manager import LoadReport, LoRAManager

__all__ = ["AdapterError", "LoRAAdapter", "LoRAManager", "LoadReport", "ModuleDelta", "load_adapter"]
