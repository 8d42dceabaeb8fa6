"""Runs one packed forward per step: all scheduled tokens of all sequences, prefill chunks and
decodes mixed, as a single [1, T] batch through the transformers model.

The runner turns the scheduled batch into flat tensors (token ids, positions, cache slots, per-token
LoRA slots) and the attention groups; everything per layer then works on tensors only."""

import numpy as np
import torch
from torch import nn

from loraserve.engine.context import ForwardContext, LoRABatch, forward_context
from loraserve.engine.kv_cache import KVCache
from loraserve.engine.scheduler import ScheduledBatch
from loraserve.engine.sequence import Sequence
from loraserve.model.attention import AttentionGroup, AttentionMetadata
from loraserve.model.decoder import LeanDecoder

PAD_POS = 1 << 30   # position given to padding keys: after every query, so causality hides them


class ModelRunner:
    def __init__(self, model: nn.Module, kv_cache: KVCache, device: torch.device, decode_kernel: object | None = None,
                 decoder: LeanDecoder | None = None):
        self.model = model
        self.decoder = decoder                      # model/decoder.py's flat forward, or None: transformers' own
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = device
        self.decode_kernel = decode_kernel          # model/kernels.py's paged attention (CPU), or None

    def _blocks(self, seq: Sequence, end: int) -> np.ndarray:
        """The blocks holding positions [0, end) of `seq`."""
        return np.asarray(seq.block_table[:-(-end // self.block_size)], dtype=np.int64)

    def prepare(self, batch: ScheduledBatch) -> tuple[dict, ForwardContext, list[Sequence]]:
        ids, pos, slot_mapping, token_slots, keep, seq_blocks = [], [], [], [], [], []
        decode_rows, decode_blocks, decode_ends = [], [], []
        groups: list[AttentionGroup] = []
        offset = 0
        sampling: list[Sequence] = []
        for seq, n in batch:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids.extend(seq.token_ids[start:end])
            blocks = self._blocks(seq, end)
            seq_blocks.append(blocks)
            positions = np.arange(start, end)
            pos.append(positions)
            slot_mapping.append(blocks[positions // self.block_size] * self.block_size + positions % self.block_size)
            token_slots.append(np.full(n, seq.lora_slot))
            if end == len(seq):                   # the last prompt chunk or a decode: sample a token
                keep.append(offset + n - 1)
                sampling.append(seq)
            if n == 1:
                decode_rows.append(offset)
                decode_blocks.append(blocks)
                decode_ends.append(end)
            else:
                groups.append(self._prefill_group(offset, start, end, blocks))
            offset += n
        if decode_rows:
            groups.append(self._decode_group(decode_rows, decode_blocks, decode_ends))
        dev = self.device
        all_positions = np.concatenate(pos)
        inputs = {
            "input_ids": torch.tensor(ids, device=dev)[None],
            "position_ids": torch.from_numpy(all_positions).to(dev)[None],
            "logits_to_keep": torch.tensor(keep, dtype=torch.long, device=dev),
        }
        md = AttentionMetadata(self.kv_cache, torch.from_numpy(np.concatenate(slot_mapping)).to(dev), groups,
                               self.decode_kernel)
        if self.decode_kernel is not None:
            md.query_tables = torch.from_numpy(self._query_tables(batch, seq_blocks, len(all_positions)))
            md.query_lens = torch.from_numpy(all_positions + 1)
        slots = torch.from_numpy(np.concatenate(token_slots)).to(dev)
        lora = LoRABatch.from_token_slots(slots)
        return inputs, ForwardContext(attn=md, lora=lora if lora.any_lora else None), sampling

    @staticmethod
    def _query_tables(batch: ScheduledBatch, seq_blocks: list[np.ndarray], num_tokens: int) -> np.ndarray:
        """[T, nb]: each token's row is its sequence's block table (zero-padded; the kernel reads only the
        blocks of its context)."""
        tables = np.zeros((num_tokens, max(len(b) for b in seq_blocks)), dtype=np.int64)
        offset = 0
        for (_, n), blocks in zip(batch, seq_blocks):
            tables[offset:offset + n, :len(blocks)] = blocks
            offset += n
        return tables

    def _key_positions(self, num_blocks: int, end: int) -> np.ndarray:
        """Positions of the keys in `num_blocks` gathered blocks: PAD_POS past the context's end, so
        causality hides stale slots of a sequence's last block and padding blocks alike."""
        pos = np.arange(num_blocks * self.block_size)
        pos[end:] = PAD_POS
        return pos

    def _prefill_group(self, offset: int, start: int, end: int, blocks: np.ndarray) -> AttentionGroup:
        dev, n = self.device, end - start
        return AttentionGroup(
            rows=torch.arange(offset, offset + n, device=dev)[None],
            span=slice(offset, offset + n),
            q_pos=torch.arange(start, end, device=dev)[None],
            kv_blocks=torch.from_numpy(blocks).to(dev)[None],
            kv_pos=torch.from_numpy(self._key_positions(len(blocks), end)).to(dev)[None],
        )

    def _decode_group(self, rows: list[int], blocks: list[np.ndarray], ends: list[int]) -> AttentionGroup:
        dev, b = self.device, len(rows)
        width = max(len(t) for t in blocks)
        kv_blocks = np.zeros((b, width), dtype=np.int64)     # padding gathers block 0, hidden by kv_pos
        kv_pos = np.empty((b, width * self.block_size), dtype=np.int64)
        for i, (table, end) in enumerate(zip(blocks, ends)):
            kv_blocks[i, :len(table)] = table
            kv_pos[i] = self._key_positions(width, end)
        return AttentionGroup(
            rows=torch.tensor(rows, device=dev)[:, None],
            span=slice(rows[0], rows[0] + b) if rows == list(range(rows[0], rows[0] + b)) else None,
            q_pos=torch.tensor([e - 1 for e in ends], device=dev)[:, None],
            kv_blocks=torch.from_numpy(kv_blocks).to(dev),
            kv_pos=torch.from_numpy(kv_pos).to(dev),
        )

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        """Forward the batch; return logits [S, V] of the sequences that sample this step."""
        inputs, ctx, sampling = self.prepare(batch)
        with forward_context(ctx):
            if self.decoder is not None:
                ids, pos = inputs["input_ids"][0], inputs["position_ids"][0]
                return self.decoder(ids, pos, inputs["logits_to_keep"]), sampling
            out = self.model(**inputs, use_cache=False)
        return out.logits[0], sampling
