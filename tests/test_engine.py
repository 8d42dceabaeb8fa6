"""Engine behaviour on a tiny random Llama: preemption, aborts, stops, sampling parameters."""

import asyncio

import pytest
import torch

from loraserve.config import EngineConfig
from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.llm_engine import LLMEngine, RequestError, UnknownModelError
from loraserve.engine.sampling_params import SamplingParams
from tiny_models import VOCAB, IdTokenizer, tiny_model


def engine(**overrides) -> LLMEngine:
    model, _ = tiny_model("llama")
    cfg = {"model": "tiny", "num_kv_blocks": 64, "block_size": 4, "max_num_batched_tokens": 16, "max_num_seqs": 8}
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg), model, IdTokenizer())


def prompts(n: int, length: int = 10, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length + i,), generator=g).tolist() for i in range(n)]


GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def test_preemption_under_block_pressure_gives_the_same_tokens():
    ps = prompts(6)
    roomy = engine().generate(ps, GREEDY)
    tight = engine(num_kv_blocks=14)          # 6 sequences of ~30 tokens need ~48 blocks: forced to preempt
    preempted = []
    orig = tight.scheduler._preempt
    tight.scheduler._preempt = lambda seq: (preempted.append(seq.request_id), orig(seq))
    assert tight.generate(ps, GREEDY) == roomy
    assert preempted, "the tight cache should have forced a preemption"
    assert tight.blocks.num_free == tight.blocks.num_blocks


def test_abort_frees_blocks_at_once():
    e = engine()
    e.add_request("a", prompts(1)[0], GREEDY)
    e.add_request("b", prompts(1, seed=1)[0], GREEDY)
    e.step()
    e.step()
    assert e.blocks.num_free < e.blocks.num_blocks
    e.abort("a")
    e.abort("b")
    assert e.blocks.num_free == e.blocks.num_blocks
    assert not e.has_unfinished()


def test_stop_string_cuts_text_and_finishes():
    e = engine()
    full = e.generate(prompts(1), GREEDY)[0]
    stop = f" {full[3]}"                       # IdTokenizer text is " id id id ..."
    e.add_request("s", prompts(1)[0], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop]))
    streamed, last = "", None
    while e.has_unfinished():
        for out in e.step():
            streamed += out.new_text
            last = out
    assert last.finish_reason == "stop"
    expected = "".join(f" {t}" for t in full)
    assert last.text == expected[:expected.find(stop)]
    assert streamed == last.text


def test_stop_token_ids_and_length_finish_reasons():
    e = engine()
    full = e.generate(prompts(1), GREEDY)[0]
    e.add_request("t", prompts(1)[0], SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[full[2]]))
    e.add_request("l", prompts(1)[0], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    done = {}
    while e.has_unfinished():
        done.update({o.request_id: o for o in e.step() if o.finished})
    assert done["t"].finish_reason == "stop" and done["t"].output_token_ids == full[:full.index(full[2]) + 1]
    assert done["l"].finish_reason == "length" and len(done["l"].output_token_ids) == 5


def test_seeded_sampling_does_not_depend_on_the_batch():
    p = prompts(1)[0]
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=20, seed=7, ignore_eos=True)
    alone = engine().generate([p], seeded)[0]
    crowd = engine().generate([p] + prompts(5, seed=3), seeded)[0]
    assert alone == crowd
    other_seed = engine().generate([p], SamplingParams(**{**vars(seeded), "seed": 8}))[0]
    assert other_seed != alone


def test_top_k_one_is_greedy_and_penalties_change_output():
    ps = prompts(3)
    greedy = engine().generate(ps, GREEDY)
    assert engine().generate(ps, SamplingParams(max_tokens=16, temperature=1.0, top_k=1, ignore_eos=True)) == greedy
    penal = engine().generate(ps, SamplingParams(max_tokens=16, temperature=0, frequency_penalty=2.0,
                                                 presence_penalty=2.0, ignore_eos=True))
    assert penal != greedy
    # A strong presence penalty makes a repeat far less likely than without it.
    assert sum(len(set(o)) for o in penal) > sum(len(set(o)) for o in greedy)


def test_logprobs_are_log_softmax_of_the_logits():
    e = engine()
    p = prompts(1)[0]
    e.add_request("lp", p, SamplingParams(max_tokens=1, temperature=0, logprobs=3, ignore_eos=True))
    (out,) = e.step()
    _, ref = tiny_model("llama")
    expected = torch.log_softmax(ref(torch.tensor([p])).logits[0, -1], dim=-1)
    lp = out.new_logprobs[0]
    assert lp.token_id == out.output_token_ids[0] == int(expected.argmax())
    assert abs(lp.logprob - expected.max().item()) < 1e-4
    assert [t for t, _ in lp.top] == expected.topk(3).indices.tolist()


def test_bad_requests_are_refused_with_the_reason():
    e = engine(max_model_len=40)
    with pytest.raises(RequestError, match="maximum context length is 40.*30 in the prompt, 16"):
        e.add_request("x", list(range(30)), GREEDY)
    with pytest.raises(RequestError, match="empty"):
        e.add_request("x", [], GREEDY)
    with pytest.raises(ValueError, match="max_tokens"):
        e.add_request("x", [1, 2], SamplingParams(max_tokens=0))
    with pytest.raises(UnknownModelError, match="Served models: tiny"):
        e.add_request("x", [1, 2], GREEDY, model="nope")
    with pytest.raises(RequestError, match="above the model's max_position_embeddings 512"):
        engine(max_model_len=4096)


def test_async_engine_streams_and_aborts_on_close():
    model, _ = tiny_model("llama")
    cfg = EngineConfig(model="tiny", num_kv_blocks=64, block_size=4, max_num_batched_tokens=16)

    async def main():
        ae = AsyncEngine(cfg, model, IdTokenizer())
        await ae.start()
        try:
            outs = [o async for o in ae.generate(prompts(1)[0], GREEDY)]
            assert outs[-1].finished and len(outs[-1].output_token_ids) == 16
            assert sum(len(o.new_token_ids) for o in outs) == 16
            long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
            gen = ae.generate(prompts(1)[0], long)
            await gen.__anext__()
            await gen.aclose()                        # a client going away
            for _ in range(100):
                if ae.stats()["kv_blocks_free"] == ae.stats()["kv_blocks_total"]:
                    break
                await asyncio.sleep(0.01)
            assert ae.stats()["kv_blocks_free"] == ae.stats()["kv_blocks_total"]
            assert ae.stats()["num_running"] == 0
        finally:
            await ae.shutdown()
    asyncio.run(main())


def test_a_failing_idle_measurement_never_stops_the_loop(caplog):
    model, _ = tiny_model("llama")
    cfg = EngineConfig(model="tiny", num_kv_blocks=64, block_size=4, max_num_batched_tokens=16)

    async def main():
        ae = AsyncEngine(cfg, model, IdTokenizer())
        calls = []

        def broken() -> bool:
            calls.append(1)
            raise RuntimeError("probe failed")
        ae.engine.measure_pending_effects = broken      # inject the fault the loop must survive
        await ae.start()
        try:
            for _ in range(100):
                if calls:
                    break
                await asyncio.sleep(0.01)
            outs = [o async for o in ae.generate(prompts(1)[0], GREEDY)]
            assert outs[-1].finished and ae.is_running
            await asyncio.sleep(0.6)                    # idle again: the broken measurement is not retried
            assert len(calls) == 1
        finally:
            await ae.shutdown()
    asyncio.run(main())
    assert "measuring adapters' effect failed" in caplog.text


def test_token_budget_default_follows_the_gemm_and_a_set_one_wins():
    from types import SimpleNamespace
    assert LLMEngine._default_token_budget(None) == 512                      # oneDNN, float32, CUDA
    assert LLMEngine._default_token_budget(SimpleNamespace(path="avx512_bf16")) == 512
    assert LLMEngine._default_token_budget(SimpleNamespace(path="avx2_fma")) == 128
    assert engine().scheduler.max_num_batched_tokens == 16                    # set: used as it is
    e = engine(max_num_batched_tokens=None)                                   # float32 tiny model: no GEMM kernel
    assert e.token_budget == 512 and e.scheduler.max_num_batched_tokens == 512
