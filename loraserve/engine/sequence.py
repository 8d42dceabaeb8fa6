"""A sequence: one prompt being completed, with its tokens, KV blocks and text so far."""

import itertools
from enum import Enum, auto

import torch

from loraserve.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_ids = itertools.count()


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 lora_name: str | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)   # prompt + generated
        self.params = params
        self.lora_name = lora_name                # None: the base model
        self.lora_slot = -1                       # device slot while running; -1 = base
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0              # tokens whose K/V sit in the cache
        self.block_table: list[int] = []
        self.finish_reason: str | None = None
        # Per-request generator: a seeded request samples the same tokens whatever shares its batch.
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        # Detokenization state: text is everything decoded so far, emitted what was handed out.
        self.text = ""
        self.num_emitted_chars = 0
        self.detokenizer = None                   # engine.detokenizer.Detokenizer, made on the first token

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
