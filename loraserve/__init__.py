"""loraserve: one base model plus many LoRA adapters, each applied exactly or refused."""

__version__ = "0.1.0"
