"""The sampler's plain-greedy shortcut (argmax in the model's dtype) picks exactly the token the float32
path picks, ties included."""

import torch

from loraserve.engine.sampling_params import SamplingParams
from loraserve.engine.sequence import Sequence
from loraserve.model.sampler import Sampler


def test_bf16_greedy_shortcut_equals_the_float_path_with_ties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=g).to(torch.bfloat16)
    logits[1, [3, 700]] = 50.0          # a tie: the first index wins on both paths
    logits[2, :] = 1.0                  # all equal
    greedy = [Sequence(f"g{i}", [1], SamplingParams(temperature=0)) for i in range(6)]
    tokens, _ = Sampler()(logits, greedy)
    assert tokens == logits.float().argmax(dim=-1).tolist()       # what the float path's greedy rows take
    assert tokens[1] == 3 and tokens[2] == 0
