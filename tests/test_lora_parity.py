"""PEFT is the oracle: in one packed forward mixing several adapters and base rows, every adapter row's
logits equal PeftModel's (that adapter alone), float32 max abs diff < 1e-4, and every base row equals
the base model's bit for bit."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kernel_fixtures import built_or_skip
from lora_fixtures import base_logits, make_adapter, mixed_logits, peft_logits, tiny_model
from loraserve.lora import LoRAManager, fused
from loraserve.model import kernels

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
TOL = 1e-4


def assert_parity(base: torch.nn.Module, paths: list[Path], plan: list[int], seq_len: int = 6,
                  kernel: object | None = None) -> LoRAManager:
    """`plan[i]` is the index into `paths` that row i uses, or -1 for the base model. `kernel`: the C++
    multi-LoRA kernel for the projection groups (None: PyTorch matmuls)."""
    served = copy.deepcopy(base)
    manager = LoRAManager(served, max_loras=4, kernel=kernel, deltas_beside=getattr(kernel, "deltas_beside", False))
    slots = []
    for i, path in enumerate(paths):
        manager.load(f"a{i}", str(path))
        slots.append(manager.activate(f"a{i}"))
    ids = torch.randint(1, base.config.vocab_size, (len(plan), seq_len), generator=torch.Generator().manual_seed(7))
    out = mixed_logits(served, ids, [slots[p] if p >= 0 else -1 for p in plan])
    plain = base_logits(base, ids)
    for row, p in enumerate(plan):
        if p < 0:
            assert torch.equal(out[row], plain[row]), f"base row {row} changed"
    for p, path in enumerate(paths):  # one PeftModel per adapter, on all its rows
        rows = [row for row, q in enumerate(plan) if q == p]
        want = peft_logits(base, path, ids[rows])
        assert (want - plain[rows]).abs().amax() > 1e-2, "the adapter should visibly change its rows"
        diff = (out[rows] - want).abs().max().item()
        assert diff < TOL, f"adapter {p} (rows {rows}): max abs diff {diff}"
    return manager


class CountingKernel:
    """The real kernel, counting its calls: proves the adapter rows went through it. `deltas_beside`: the
    groups run the deltas on the kernel's helper thread (start / finish) instead of apply, up to
    BESIDE_MAX_ROWS rows."""

    def __init__(self, kernel, deltas_beside: bool = False) -> None:
        self.kernel, self.calls, self.deltas_beside = kernel, 0, deltas_beside

    def b_pairs(self, like):
        return self.kernel.b_pairs(like)

    def Group(self, *bound):   # noqa: N802 - the kernel's class name
        group, counter = self.kernel.Group(*bound), self

        class Counted:
            def apply(self, x, *args):
                assert not counter.deltas_beside or x.shape[-2] > fused.BESIDE_MAX_ROWS   # prompt chunks: in place
                counter.calls += 1
                return group.apply(x, *args)

            def start(self, x, token_slots, next_group=None, after=None):
                assert counter.deltas_beside
                counter.calls += 1
                return group.start(x, token_slots, *(g.group if g is not None else None for g in (next_group, after)))

            def finish(self, y):
                return group.finish(y)

        counted = Counted()
        counted.group = group                          # what a group before it passes as `next`
        return counted


@pytest.fixture(params=["torch-lora", "torch-lora-unstacked", "cpp-lora", "cpp-lora-beside"])
def lora_kernel(request, monkeypatch):
    """The multi-LoRA kernel a test's groups use: None for the PyTorch path, whose groups stack the base
    weights with the A's on CPU; "unstacked" runs it as on CUDA (each member's own base GEMM)."""
    if request.param.startswith("torch-lora"):
        if request.param == "torch-lora-unstacked":
            monkeypatch.setattr("loraserve.lora.fused.stacks_bit_exactly", lambda weight: False)
        yield None
        return
    counting = CountingKernel(built_or_skip(kernels.multi_lora(), "LoRA uses its PyTorch path"),
                              deltas_beside=request.param == "cpp-lora-beside")
    yield counting
    assert counting.calls > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3", "gemma4"])
def test_mixed_batch_matches_peft(arch: str, tmp_path: Path, lora_kernel) -> None:
    base = tiny_model(arch)
    paths = [
        make_adapter(base, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]),
        make_adapter(base, tmp_path / "b", seed=2, r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
        make_adapter(base, tmp_path / "c", seed=3, r=2, lora_alpha=5, target_modules=r".*\.mlp\.(up|down)_proj"),
    ]
    manager = assert_parity(base, paths, [0, -1, 1, 2, -1, 0], kernel=lora_kernel)
    # The groups stacked the base weights where the device gives stacked columns bit for bit (CPU), unless
    # the fixture made them run as on CUDA.
    assert all(g.stack_base == fused.stacks_bit_exactly(g.members[0].base_layer.weight) for g in manager.groups)


def test_rank_and_alpha_pattern(tmp_path: Path, lora_kernel) -> None:
    base = tiny_model()
    path = make_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        rank_pattern={"layers.1.self_attn.q_proj": 8, "down_proj": 2},
                        alpha_pattern={"v_proj": 3, r"layers\.0\.mlp\.down_proj": 32})
    manager = assert_parity(base, [path], [0, -1], kernel=lora_kernel)
    assert manager.reports["a0"].ranks == [2, 4, 8]
    assert manager.reports["a0"].alphas == [3, 8, 32]


@pytest.mark.parametrize("layers_pattern", [None, "layers"])
def test_layers_to_transform(layers_pattern: str | None, tmp_path: Path) -> None:
    base = tiny_model()
    path = make_adapter(base, tmp_path / "a", target_modules=["q_proj", "up_proj"], layers_to_transform=[1],
                        layers_pattern=layers_pattern)
    manager = assert_parity(base, [path], [0, -1])
    assert all(".layers.1." in m for m in manager.adapters["a0"].modules)


def test_exclude_modules(tmp_path: Path) -> None:
    base = tiny_model()
    path = make_adapter(base, tmp_path / "a", target_modules="all-linear", exclude_modules=["o_proj", "gate_proj"])
    assert_parity(base, [path], [0, -1])


def test_fan_in_fan_out_is_inert_on_linear(tmp_path: Path) -> None:
    """fan_in_fan_out concerns GPT-2 style Conv1D base weights; PEFT turns it off for nn.Linear (and then
    saves false), so a config saying true, e.g. from a Conv1D model, applies to Linear layers unchanged."""
    base = tiny_model()
    path = make_adapter(base, tmp_path / "a", use_dora=True)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    assert_parity(base, [path], [0, -1])


@pytest.mark.parametrize("option", [{"bias": "all"}, {"bias": "lora_only"}, {"lora_bias": True}])
def test_bias_options(option: dict, tmp_path: Path) -> None:
    base = tiny_model("qwen2")  # q/k/v carry biases
    path = make_adapter(base, tmp_path / "a", target_modules=["q_proj", "o_proj"], **option)
    other = make_adapter(base, tmp_path / "b", seed=2, target_modules=["k_proj"])
    manager = assert_parity(base, [path, other], [0, -1, 1])
    assert "bias" in manager.reports["a0"].features


@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama", True), ("gemma3", True)])
def test_embedding_and_lm_head_lora(arch: str, tie: bool, tmp_path: Path) -> None:
    base = tiny_model(arch, tie=tie)
    path = make_adapter(base, tmp_path / "a", target_modules=["embed_tokens", "lm_head", "q_proj"])
    other = make_adapter(base, tmp_path / "b", seed=2, target_modules=["embed_tokens"])
    weight = base.get_input_embeddings().weight.clone()
    manager = assert_parity(base, [path, other], [0, -1, 1])
    served_emb = manager.model.get_input_embeddings().weight
    assert torch.equal(served_emb, weight), "the shared base embedding must never be modified"
    assert (served_emb is manager.model.get_output_embeddings().weight) == tie


@pytest.mark.parametrize("arch,tie,mts", [("llama", False, ["lm_head", "embed_tokens"]), ("llama", True, ["lm_head"]),
                                          ("gemma3", True, ["embed_tokens"]), ("qwen2", False, ["k_proj"])])
def test_modules_to_save(arch: str, tie: bool, mts: list[str], tmp_path: Path) -> None:
    base = tiny_model(arch, tie=tie)
    path = make_adapter(base, tmp_path / "a", target_modules=["q_proj"], modules_to_save=mts)
    other = make_adapter(base, tmp_path / "b", seed=2, target_modules=["q_proj", "lm_head"])
    manager = assert_parity(base, [path, other], [0, -1, 1, 0])
    assert any(f.startswith("modules_to_save") for f in manager.reports["a0"].features)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dora(arch: str, tmp_path: Path) -> None:
    base = tiny_model(arch)
    path = make_adapter(base, tmp_path / "a", use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    plain = make_adapter(base, tmp_path / "b", seed=2, target_modules=["q_proj"])
    assert_parity(base, [path, plain], [0, -1, 1])


@pytest.mark.parametrize("arch,tie,spec", [("llama", False, [1, 5, 9]), ("llama", True, [1, 5]),
                                           ("gemma3", True, {"embed_tokens": [3, 4]})])
def test_trainable_token_indices(arch: str, tie: bool, spec, tmp_path: Path) -> None:
    """The chosen token rows are replaced; with tied embeddings PEFT replaces the lm_head rows too."""
    base = tiny_model(arch, tie=tie)
    path = make_adapter(base, tmp_path / "a", target_modules=["q_proj"], trainable_token_indices=spec)
    other = make_adapter(base, tmp_path / "b", seed=2, target_modules=["v_proj"])
    served = copy.deepcopy(base)
    manager = LoRAManager(served, max_loras=2)
    manager.load("tt", str(path))
    manager.load("other", str(other))
    s_tt, s_other = manager.activate("tt"), manager.activate("other")
    ids = torch.tensor([[1, 5, 7, 9, 3], [1, 5, 7, 9, 3], [4, 3, 1, 5, 9]])
    out = mixed_logits(served, ids, [s_tt, s_other, s_tt])
    for row, adapter in [(0, path), (1, other), (2, path)]:
        assert (out[row] - peft_logits(base, adapter, ids[row:row + 1])[0]).abs().max() < TOL


def test_multimodal_prefix_maps_to_text_model(tmp_path: Path) -> None:
    """Gemma 3/4 multimodal checkpoints name the text model `language_model`; on a text-only served
    model those tensors must land on the same modules (and match PEFT on the text model)."""
    base = tiny_model("gemma3")
    path = make_adapter(base, tmp_path / "a", target_modules=["q_proj", "lm_head"])
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    tensors = load_file(path / "adapter_model.safetensors")
    tensors = {k.replace("base_model.model.model.", "base_model.model.model.language_model."): v
               for k, v in tensors.items()}
    save_file(tensors, renamed / "adapter_model.safetensors")
    (renamed / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    manager = LoRAManager(copy.deepcopy(base), max_loras=1)
    manager.load("mm", str(renamed))
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(3))
    out = mixed_logits(manager.model, ids, [manager.activate("mm")])
    assert (out[0] - peft_logits(base, path, ids)[0]).abs().max() < TOL
    assert "model.layers.0.self_attn.q_proj" in manager.adapters["mm"].modules


def test_adapter_bin_file(tmp_path: Path) -> None:
    base = tiny_model()
    path = make_adapter(base, tmp_path / "a")
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(load_file(path / "adapter_model.safetensors"), binary / "adapter_model.bin")
    (binary / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    served = copy.deepcopy(base)
    manager = LoRAManager(served, max_loras=1)
    manager.load("bin", str(binary))
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(3))
    assert (mixed_logits(served, ids, [manager.activate("bin")])[0] - peft_logits(base, path, ids)[0]).abs().max() < TOL


OPTIONS = {
    "rslora": {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": "all-linear"},
    "patterns": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                 "rank_pattern": {"q_proj": 6}, "alpha_pattern": {"down_proj": 2}},
    "layers": {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    "embed-head": {"target_modules": ["embed_tokens", "lm_head", "o_proj"]},
    "modules-to-save": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    "dora": {"use_dora": True, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "trainable-tokens": {"target_modules": ["o_proj"], "trainable_token_indices": [1, 5, 9]},
}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gemma4"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_every_option_on_every_architecture(arch: str, option: str, tmp_path: Path) -> None:
    """Each option beside a plain adapter and base rows, on each architecture the issue names."""
    base = tiny_model(arch)
    path = make_adapter(base, tmp_path / "a", **OPTIONS[option])
    plain = make_adapter(base, tmp_path / "b", seed=2, target_modules=["k_proj", "gate_proj"])
    assert_parity(base, [path, plain], [0, -1, 1, 0])
