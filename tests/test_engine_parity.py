"""The paged engine's logits equal transformers' own forward, for every architecture, through chunked
prefill and steps that mix prefill chunks with decodes (float32, max abs diff < 1e-4), with decode
attention in the C++ kernel and in PyTorch."""

import shutil

import pytest
import torch

from loraserve.config import EngineConfig
from loraserve.engine.llm_engine import LLMEngine
from loraserve.engine.sampling_params import SamplingParams
from tiny_models import ARCHS, VOCAB, IdTokenizer, tiny_model

PROMPT_LENS = [3, 17, 9, 30, 1, 12]
LEAN_ARCHS = {"llama", "qwen2", "mistral"}


def make_engine(model, **overrides) -> LLMEngine:
    cfg = dict(model="tiny", num_kv_blocks=64, block_size=4, max_num_batched_tokens=16, max_num_seqs=8)
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg), model, IdTokenizer())


def record_logits(engine: LLMEngine, batches: list) -> list[tuple[str, int, torch.Tensor]]:
    """Spy on the real runner: (request id, number of tokens seen, logits row) for every sampled row;
    `batches` collects each step's [(prompt length, tokens scheduled)]."""
    seen, run = [], engine.runner.run

    def spy(batch):
        batches.append([(s.num_prompt_tokens, n) for s, n in batch])
        logits, sampling = run(batch)
        seen.extend((s.request_id, len(s), logits[i].clone()) for i, s in enumerate(sampling))
        return logits, sampling
    engine.runner.run = spy
    return seen


@pytest.mark.parametrize("lean", [True, False], ids=["lean-forward", "hf-forward"])
@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["cpp-decode", "torch-decode"])
@pytest.mark.parametrize("arch", ARCHS)
def test_paged_logits_match_transformers(arch, cpu_kernels, lean):
    model, ref = tiny_model(arch)
    engine = make_engine(model, cpu_kernels=cpu_kernels, lean_forward=lean)
    # model/decoder.py's flat loop runs the Llama family; every other model keeps transformers' forward.
    assert (engine.runner.decoder is not None) == (lean and arch in LEAN_ARCHS)
    if cpu_kernels and (shutil.which("c++") or shutil.which("g++")):
        assert engine.runner.decode_kernel is not None      # decodes really ran through the C++ kernel
    if not cpu_kernels:
        assert engine.runner.decode_kernel is None
    batches = []
    seen = record_logits(engine, batches)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]
    # Staggered arrivals: later requests prefill (in chunks) while earlier ones decode.
    ids = []
    for i, p in enumerate(prompts):
        ids.append(f"r{i}")
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
        engine.step()
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.prompt_token_ids + out.output_token_ids
    assert set(final) == set(ids)
    with torch.no_grad():
        for rid, tokens in final.items():
            ref_logits = ref(torch.tensor([tokens], device=ref.device)).logits[0]
            rows = [(n, lg) for r, n, lg in seen if r == rid]
            assert len(rows) == 10
            for n, lg in rows:
                diff = (lg - ref_logits[n - 1]).abs().max().item()
                assert diff < 1e-4, f"{arch} {rid} at position {n - 1}: max abs diff {diff}"
    assert engine.blocks.num_free == engine.blocks.num_blocks
    # The run really chunked a prompt and mixed prefill chunks with decodes in one forward.
    assert any(1 < n < plen for b in batches for plen, n in b)
    assert any(any(n == 1 for _, n in b) and any(n > 1 for _, n in b) for b in batches)


@pytest.mark.parametrize("arch", sorted(LEAN_ARCHS))
def test_lean_forward_with_pytorch_ops_is_transformers_forward_bit_for_bit_in_bf16(arch):
    """The flat loop with PyTorch ops (CUDA, --no-cpu-kernels) does transformers' arithmetic in its order:
    bf16 logits equal the transformers-forward engine's to the last bit. (The C++ ops may differ in a
    rare last bit of RMSNorm and SiLU; tests/test_layer_ops.py bounds them.)"""
    outs = []
    for lean in (True, False):
        model, _ = tiny_model(arch, dtype=torch.bfloat16)
        engine = make_engine(model, cpu_kernels=False, lean_forward=lean)
        assert (engine.runner.decoder is not None) == lean
        seen = record_logits(engine, [])
        g = torch.Generator().manual_seed(2)
        for i, n in enumerate(PROMPT_LENS):
            engine.add_request(f"r{i}", torch.randint(0, VOCAB, (n,), generator=g).tolist(),
                               SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
        outs.append(sorted(seen, key=lambda r: r[:2]))
    lean_rows, hf_rows = outs
    assert [r[:2] for r in lean_rows] == [r[:2] for r in hf_rows] and len(lean_rows) == 6 * len(PROMPT_LENS)
    for (rid, n, a), (_, _, b) in zip(lean_rows, hf_rows):
        assert torch.equal(a, b), f"{arch} {rid} at {n}"


def test_the_lean_forward_is_refused_where_it_would_skip_something():
    """A hook on a decoder layer would never run in the flat loop: such a model keeps transformers' forward,
    and so does every architecture the loop does not reproduce (the log says why)."""
    from loraserve.model.decoder import unsupported_reason
    model, _ = tiny_model("llama")
    assert unsupported_reason(model) is None
    model.model.layers[1].register_forward_hook(lambda *args: None)
    assert unsupported_reason(model) == "hooks on the decoder layers"
    assert make_engine(model).runner.decoder is None
    assert unsupported_reason(tiny_model("gemma2")[0]) == "Gemma2DecoderLayer layers"
    assert "not a decoder-only model" in unsupported_reason(torch.nn.Linear(2, 2))
