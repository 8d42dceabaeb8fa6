"""Turn the logits of the sampled rows into tokens, honouring each request's own parameters.

Greedy rows take the argmax; the rest go through penalties, temperature, top-k and top-p in one
batched pass and then draw with the exponential-race trick (argmax of p / Exp(1) noise), which lets a
seeded request draw its noise from its own generator: its tokens do not depend on its batch."""

import torch

from loraserve.engine.outputs import TokenLogprob
from loraserve.engine.sequence import Sequence


class Sampler:
    def __init__(self, seed: int = 0, kernel: object | None = None):
        self.generator = torch.Generator().manual_seed(seed)   # for unseeded requests
        self.kernel = kernel            # kernels.layer_ops() (CPU): a vectorized argmax for greedy rows

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        if all(s.params.greedy and s.params.logprobs is None and not s.params.presence_penalty
               and not s.params.frequency_penalty for s in seqs):
            # Plain greedy reads the model's own dtype: bf16 -> float32 is exact and max() returns the
            # first maximal index, as argmax does, so the tokens are the same without a float copy of
            # [S, vocab] (~1 ms a step). max(), not argmax(): bf16 argmax is not vectorized (5x slower).
            # The C++ argmax gives the same first index, ~10x faster again (0.23 -> 0.02 ms, batch 16).
            if self.kernel is not None and logits.device.type == "cpu":
                return self.kernel.argmax(logits).tolist(), [None] * len(seqs)
            return logits.max(dim=-1).indices.tolist(), [None] * len(seqs)
        logits = logits.float()
        raw = logits
        logits = self._apply_penalties(logits, seqs)
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled:
            idx = torch.tensor(sampled, device=logits.device)
            probs = self._filtered_probs(logits[idx], [seqs[i] for i in sampled])
            noise = torch.empty_like(probs, device="cpu")
            for row, i in enumerate(sampled):
                noise[row].exponential_(generator=seqs[i].generator or self.generator)
            tokens[idx] = (probs / noise.to(probs.device)).argmax(dim=-1)
        token_list = tokens.tolist()
        return token_list, self._logprobs(raw, seqs, token_list)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            out = seqs[i].output_token_ids
            if not out:
                continue
            counts = torch.bincount(torch.tensor(out, device=logits.device), minlength=logits.shape[-1])
            p = seqs[i].params
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        return logits

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        temps = torch.tensor([s.params.temperature for s in seqs], device=logits.device)
        logits = logits / temps[:, None]
        top_k = [s.params.top_k for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            vocab = logits.shape[-1]
            ks = torch.tensor([k if k > 0 else vocab for k in top_k], device=logits.device)
            rank = torch.arange(vocab, device=logits.device)[None, :]
            drop = rank >= ks[:, None]
            sorted_probs = sorted_logits.softmax(dim=-1)
            ps = torch.tensor(top_p, device=logits.device)
            # The mass before each token: keep the token that crosses p.
            drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs) >= ps[:, None]
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
        return logits.softmax(dim=-1)

    @staticmethod
    def _logprobs(raw: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> list[TokenLogprob | None]:
        result: list[TokenLogprob | None] = [None] * len(seqs)
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if not rows:
            return result
        lp = torch.log_softmax(raw[rows], dim=-1)
        for j, i in enumerate(rows):
            k = seqs[i].params.logprobs
            top = []
            if k:
                vals, ids = lp[j].topk(k)
                top = list(zip(ids.tolist(), vals.tolist()))
            result[i] = TokenLogprob(tokens[i], lp[j, tokens[i]].item(), top)
        return result
