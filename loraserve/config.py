"""Plain dataclass configs: what the engine is asked to do, in one place."""

from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    model: str                              # HF model directory or a .gguf file
    served_model_name: str | None = None    # defaults to the model path's name
    dtype: str = "auto"                     # auto | float32 | bfloat16 | float16
    device: str = "auto"                    # auto | cpu | cuda
    max_model_len: int | None = None        # defaults to the model's max_position_embeddings
    max_num_seqs: int = 64                  # sequences in the running batch at once
    max_num_batched_tokens: int | None = None   # tokens in one packed forward (chunked-prefill budget); None: the
                                                # engine's default for its hardware (LLMEngine.token_budget)
    block_size: int = 16                    # tokens per KV-cache block
    num_kv_blocks: int | None = None        # None: sized from kv_cache_memory_gb
    kv_cache_memory_gb: float = 2.0
    seed: int = 0
    prepack_weights: bool = True            # CPU bf16: oneDNN-packed weight copies (model/cpu_gemm.py)
    cpu_kernels: bool = True                # CPU: the C++ decode-attention and multi-LoRA kernels (model/kernels.py)
    lean_forward: bool = True               # Llama/Qwen2/Mistral: loraserve's flat layer loop (model/decoder.py)
    num_threads: int | None = None          # torch threads of the async serving loop (None: torch's default)
    helper_thread: bool = True              # CPU kernels, 1 engine thread, 2+ cores: a helper thread shares each
    #                                         GEMM's columns and the attention's heads and runs the adapters'
    #                                         deltas (csrc/helper_thread.h)
    trust_remote_code: bool = False
    lora: "LoRAConfig" = field(default_factory=lambda: LoRAConfig())


@dataclass
class LoRAConfig:
    enable_lora: bool = False
    lora_modules: dict[str, str] = field(default_factory=dict)   # name -> adapter directory
    max_lora_rank: int | None = None        # None: no cap; a set cap refuses (never clips)
    max_loras: int = 8                      # adapters resident in device slots at once
    max_cpu_loras: int | None = None        # adapters kept in host memory (LRU)
