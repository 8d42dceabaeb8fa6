"""Isolation between rows of one batch, and the slot life cycle: activate/pin, release, LRU eviction,
unload, and that a reused slot carries nothing of its previous adapter."""

import copy
from pathlib import Path

import pytest
import torch

from lora_fixtures import base_logits, make_adapter, mixed_logits, peft_logits, tiny_model
from loraserve.engine.context import ForwardContext, LoRABatch, forward_context
from loraserve.lora import AdapterError, LoRAManager
from loraserve.lora.layers import MultiLoRAEmbedding, MultiLoRALinear

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("adapters")
    base = tiny_model(tie=True)
    paths = {
        "x": make_adapter(base, tmp / "x", seed=1, r=8, target_modules="all-linear"),
        "y": make_adapter(base, tmp / "y", seed=2, r=4, target_modules=["embed_tokens", "lm_head", "q_proj"]),
        "z": make_adapter(base, tmp / "z", seed=3, r=2, use_dora=True, target_modules=["v_proj", "up_proj"]),
        "w": make_adapter(base, tmp / "w", seed=4, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    }
    return base, paths


def test_rows_are_isolated_bit_for_bit(setup) -> None:
    """A base row equals the base model, and an adapter row keeps its exact value, whatever the
    other rows of the batch use."""
    base, paths = setup
    served = copy.deepcopy(base)
    manager = LoRAManager(served, max_loras=4)
    slot = {}
    for name, path in paths.items():
        manager.load(name, str(path))
        slot[name] = manager.activate(name)
    ids = torch.randint(0, 256, (4, 5), generator=torch.Generator().manual_seed(0))
    ids[:] = ids[0]
    x, y, z, w = slot["x"], slot["y"], slot["z"], slot["w"]
    batches = [[-1, x, y, w], [-1, x, z, -1], [-1, x, -1, -1], [-1, x, x, z]]
    outs = [mixed_logits(served, ids, plan) for plan in batches]
    plain = base_logits(base, ids)
    for out in outs:
        assert torch.equal(out[0], plain[0])
        assert torch.equal(out[1], outs[0][1])
    assert not torch.equal(outs[0][1], plain[0])


def test_no_context_is_the_base_model(setup) -> None:
    base, paths = setup
    served = copy.deepcopy(base)
    manager = LoRAManager(served, max_loras=2)
    manager.load("x", str(paths["x"]))
    manager.activate("x")
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(served(input_ids=ids).logits, base_logits(base, ids))
    assert torch.equal(mixed_logits(served, ids, [-1, -1]), base_logits(base, ids))


def test_wrap_keeps_base_weights_shared(setup) -> None:
    base, _ = setup
    served = copy.deepcopy(base)
    manager = LoRAManager(served, max_loras=2)
    assert isinstance(served.lm_head, MultiLoRALinear)
    assert isinstance(served.model.embed_tokens, MultiLoRAEmbedding)
    assert served.lm_head.weight is served.model.embed_tokens.weight
    assert len(manager.layers) == 2 * 7 + 2


def test_lru_eviction_and_slot_reuse(setup) -> None:
    base, paths = setup
    served = copy.deepcopy(base)
    manager = LoRAManager(served, max_loras=2)
    for name in ("x", "y", "z"):
        manager.load(name, str(paths[name]))
    sx, sy = manager.activate("x"), manager.activate("y")
    with pytest.raises(AdapterError, match="all 2 LoRA slots are in use"):
        manager.activate("z")
    assert manager.try_activate("z") is None
    manager.release("x")
    manager.release("y")
    assert manager.activate("y") == sy  # still resident: no reload, and now most recently used
    manager.release("y")
    sz = manager.activate("z")  # evicts x, the least recently used
    assert sz == sx and manager.slot_of("x") is None and manager.slot_of("y") == sy
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    out = mixed_logits(served, ids, [sz, sy])
    # z (rank 2, DoRA) sits in x's old slot (rank 8, all-linear): nothing of x may remain.
    assert (out[0] - peft_logits(base, paths["z"], ids[:1])[0]).abs().max() < 1e-4
    assert (out[1] - peft_logits(base, paths["y"], ids[1:])[0]).abs().max() < 1e-4


def test_release_unload_names(setup) -> None:
    base, paths = setup
    manager = LoRAManager(copy.deepcopy(base), max_loras=2)
    report = manager.load("x", str(paths["x"]))
    assert report.ranks == [8] and report.modules_by_type["q_proj"] == 2 and report.num_tensors == 28
    assert report.num_params == 2 * (8 * (64 + 64) * 2 + 8 * (64 + 32) * 2 + 8 * (64 + 128) * 3)
    with pytest.raises(AdapterError, match="already loaded"):
        manager.load("x", str(paths["x"]))
    slot = manager.activate("x")
    manager.unload("x")      # in use: the name goes at once, the weights stay until released
    assert manager.names() == [] and manager.resolve("x") is None and manager.slot_of("x") == slot
    manager.release("x")
    assert manager.slot_of("x") is None and manager.entries == {} and manager.adapters == {}
    with pytest.raises(ValueError, match="released more often"):
        manager.release("x")
    with pytest.raises(AdapterError, match="no adapter named 'x' is loaded"):
        manager.activate("x")


def test_logits_to_keep_gives_each_kept_token_its_slot(setup) -> None:
    """The runner asks HF for logits of some positions only; the lm_head (LoRA in y, a full copy in w)
    must still apply each kept token's own adapter."""
    base, paths = setup
    served = copy.deepcopy(base)
    manager = LoRAManager(served, max_loras=2)
    manager.load("y", str(paths["y"]))
    manager.load("w", str(paths["w"]))
    sy, sw = manager.activate("y"), manager.activate("w")
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    token_slots = torch.tensor([sy] * 5 + [sw] * 5)
    with torch.no_grad(), forward_context(ForwardContext(lora=LoRABatch.from_token_slots(token_slots))):
        full = served(input_ids=ids).logits[0]
        kept = served(input_ids=ids, logits_to_keep=torch.tensor([4, 9])).logits[0]
        last = served(input_ids=ids, logits_to_keep=1).logits[0]
    torch.testing.assert_close(kept, full[[4, 9]], rtol=0, atol=1e-5)
    torch.testing.assert_close(last, full[[9]], rtol=0, atol=1e-5)
    assert (full[4] - base_logits(base, ids)[0, 4]).abs().max() > 1e-2
