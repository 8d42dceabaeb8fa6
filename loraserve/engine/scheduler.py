"""Continuous batching with chunked prefill.

Every step the scheduler builds one batch under a token budget: first one token for every decoding
sequence (so long prompts never starve them), then the next chunk of any sequence still prefilling,
then new sequences from the queue. When KV blocks run out it preempts the newest running sequence
(its blocks are freed and it is recomputed later), so requests wait rather than fail."""

from collections import deque
from collections.abc import Callable

from loraserve.engine.kv_cache import BlockManager
from loraserve.engine.sequence import Sequence, SequenceStatus

ScheduledBatch = list[tuple[Sequence, int]]   # (sequence, number of its tokens in this step)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 acquire_lora: Callable[[Sequence], bool] | None = None,
                 release_lora: Callable[[Sequence], None] | None = None):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Adapter slots are a resource like KV blocks: a sequence runs only while it holds one.
        self.acquire_lora = acquire_lora or (lambda seq: True)
        self.release_lora = release_lora or (lambda seq: None)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch: ScheduledBatch = []
        scheduled: set[int] = set()
        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prefilling = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decoding + prefilling:
            if budget == 0 or seq.status != SequenceStatus.RUNNING:
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._make_room(seq, seq.num_computed_tokens + n, scheduled):
                continue
            self.blocks.grow(seq, seq.num_computed_tokens + n)
            batch.append((seq, n))
            scheduled.add(seq.seq_id)
            budget -= n
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.blocks.can_grow(seq, n):
                break                     # first come, first served for memory
            if not self.acquire_lora(seq):
                continue                  # its adapter waits for a slot; others may still run
            self.waiting.remove(seq)
            self.blocks.grow(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def _make_room(self, seq: Sequence, num_tokens: int, scheduled: set[int]) -> bool:
        """Preempt the newest unscheduled sequences until `seq` can hold `num_tokens` tokens."""
        while not self.blocks.can_grow(seq, num_tokens):
            victims = [s for s in self.running if s.seq_id not in scheduled]
            if not victims:
                return False
            victim = victims[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        self.release_lora(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def commit(self, batch: ScheduledBatch) -> None:
        """Record that the batch's tokens now sit in the KV cache."""
        for seq, n in batch:
            seq.num_computed_tokens += n

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (done, stopped or aborted) and free its blocks and adapter slot at once."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.blocks.free(seq)
            self.release_lora(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
