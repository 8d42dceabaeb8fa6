"""The synchronous engine: add requests, call step() until they finish.

One step = schedule a batch -> one packed forward -> sample -> append tokens, detokenize, check
stops -> free what finished. The async wrapper (async_engine.py) runs this loop on a thread."""

import functools
import gc
import logging
import os
import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loraserve.config import EngineConfig
from loraserve.engine.detokenizer import Detokenizer
from loraserve.engine.kv_cache import BlockManager, KVCache, cache_specs
from loraserve.engine.model_runner import ModelRunner
from loraserve.engine.outputs import RequestOutput
from loraserve.engine.sampling_params import SamplingParams
from loraserve.engine.scheduler import Scheduler
from loraserve.engine.sequence import Sequence
from loraserve.lora.adapter import AdapterError
from loraserve.lora.manager import AdapterConflict, LoadReport, LoRAManager
from loraserve.model import kernels
from loraserve.model.attention import ATTN_NAME
from loraserve.model.cpu_gemm import prepack_linears
from loraserve.model.decoder import LeanDecoder, unsupported_reason
from loraserve.model.fused_linear import fuse_sibling_linears
from loraserve.model.loader import load_model
from loraserve.model.sampler import Sampler

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot take (too long for the context, ...); the message names why."""


class LoRANotEnabled(AdapterError):
    """An adapter operation on a server started without --enable-lora."""


class UnknownModelError(LookupError):
    """The request names a model this server does not serve; the message lists the served names."""

    def __init__(self, name: str, served: list[str]):
        super().__init__(f"The model `{name}` does not exist. Served models: {', '.join(served)}")
        self.name, self.served = name, served


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update(value if isinstance(value, list) else [value])
    return ids


class LLMEngine:
    def __init__(self, config: EngineConfig, model: PreTrainedModel | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None):
        """Loads `config.model` unless a ready (model, tokenizer) pair is passed (tests do that)."""
        if model is None:
            model, tokenizer = load_model(config.model, config.dtype, config.device, config.trust_remote_code)
        self.config = config
        self.model = model.eval()
        self.model.config._attn_implementation = ATTN_NAME
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.served_model_name = config.served_model_name or config.model.rstrip("/").split("/")[-1]
        self.max_model_len = self._max_model_len(config)
        self.eos_ids = eos_token_ids(model, tokenizer)

        gemm = None
        if config.prepack_weights:
            gemm = kernels.gemm() if self._cpu_kernels() and self.dtype == torch.bfloat16 else None
            if gemm is not None:
                gemm.set_helper(self._helper_thread())
            log.info("prepacked %d linear weights for %s", prepack_linears(self.model, gemm),
                     "the C++ bf16 GEMM" if gemm is not None else "oneDNN")
        if not config.lora.enable_lora:    # LoRA's layers group the same siblings themselves (lora/fused.py)
            log.info("fused %d q/k/v and gate/up sibling groups", fuse_sibling_linears(self.model))
        specs = cache_specs(model)   # before LoRA wrapping swaps the projections
        num_blocks = config.num_kv_blocks or int(
            config.kv_cache_memory_gb * 2**30 // (KVCache.bytes_per_token(specs, self.dtype) * config.block_size))
        self.kv_cache = KVCache(specs, num_blocks, config.block_size, self.dtype, self.device)
        self.blocks = BlockManager(num_blocks, config.block_size)
        attention_kernel = kernels.paged_attention() if self._cpu_kernels() else None
        if attention_kernel is not None:
            attention_kernel.set_helper(self._helper_thread())
        self.runner = ModelRunner(self.model, self.kv_cache, self.device, attention_kernel,
                                  self._lean_decoder(config))   # LoRA may wrap its modules later: looked up per call
        layer_ops = kernels.layer_ops() if self._cpu_kernels() else None
        if layer_ops is not None:
            layer_ops.set_helper(self._helper_thread())   # batches of 8+ rows share them with it
        self.sampler = Sampler(config.seed, layer_ops)
        self.lora = self._load_adapters(config) if config.lora.enable_lora else None
        if self._helper_thread():   # one helper thread for every kernel (csrc/helper_thread.h)
            multi_lora = kernels.multi_lora() if self.lora is not None else None
            kernels.share_helper_thread([attention_kernel, gemm, multi_lora, layer_ops])
        self.token_budget = config.max_num_batched_tokens or self._default_token_budget(gemm)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, max(self.token_budget, config.max_num_seqs),
                                   self._acquire_lora, self._release_lora)
        self.seqs: dict[str, Sequence] = {}
        # Requests the scheduler had to drop (their adapter could not be re-read); the caller reports them.
        self.failed: list[tuple[str, Exception]] = []
        log.info("engine ready: %s on %s (%s), %d KV blocks of %d tokens, max_model_len %d",
                 self.served_model_name, self.device, self.dtype, num_blocks, config.block_size, self.max_model_len)

    @staticmethod
    def _default_token_budget(gemm: object | None) -> int:
        """Tokens in one step when the user sets none: 512, or 128 where bf16 runs on the AVX2 GEMM (CPUs
        without AVX512-BF16). There a 512-token prefill chunk takes ~1.2 s on 2 cores and stalls every decode
        in its step, and a burst of prompts gets its first tokens in two lumps; smaller chunks spread them,
        and the requests that follow arrive spread too: served TTFT p50 1.57 -> 0.76 s, 145 -> 161 tok/s
        (bench/README.md)."""
        return 128 if gemm is not None and gemm.path == "avx2_fma" else 512

    def _lean_decoder(self, config: EngineConfig) -> LeanDecoder | None:
        """model/decoder.py's flat forward where the model is one it reproduces (logged either way)."""
        if not config.lean_forward:
            return None
        why = unsupported_reason(self.model)
        if why is not None:
            log.info("transformers' forward runs this model (the lean forward does not cover %s)", why)
            return None
        ops = kernels.layer_ops() if self._cpu_kernels() else None
        log.info("lean forward over %d layers, %s small ops", len(self.model.model.layers),
                 "C++" if ops is not None else "PyTorch")
        return LeanDecoder(self.model, ops)

    def _helper_thread(self) -> bool:
        """Whether the C++ kernels may use their helper thread (model/csrc/helper_thread.h): it takes the core
        the engine's one thread leaves to the HTTP server, sharing it (with more engine threads the kernels
        split their work over those instead)."""
        return (self._cpu_kernels() and self.config.helper_thread and self.config.num_threads == 1
                and len(os.sched_getaffinity(0)) >= 2)

    def _cpu_kernels(self) -> bool:
        """Whether this engine uses the C++ CPU kernels (model/csrc): on CPU in float32 or bfloat16."""
        return self.config.cpu_kernels and self.device.type == "cpu" and self.dtype in (torch.bfloat16, torch.float32)

    def _max_model_len(self, config: EngineConfig) -> int:
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if config.max_model_len is None:
            if limit is None:
                raise RequestError("the model config has no max_position_embeddings: pass --max-model-len")
            return limit
        if limit is not None and config.max_model_len > limit:
            raise RequestError(f"--max-model-len {config.max_model_len} is above the model's "
                               f"max_position_embeddings {limit}")
        return config.max_model_len

    def _load_adapters(self, config: EngineConfig) -> LoRAManager:
        """Load every --lora-modules adapter; if any is bad, refuse to start and name each one and why."""
        kernel = kernels.multi_lora() if self._cpu_kernels() else None
        beside = kernel is not None and self._helper_thread()
        if kernel is not None:
            kernel.set_helper(beside)     # the in-place apply (prompt chunks) shares its blocks with the helper
            log.info("multi-LoRA deltas: %s", "on the helper thread beside each base GEMM" if beside
                     else "after each base GEMM")
        manager = LoRAManager(self.model, config.lora.max_loras, config.lora.max_lora_rank,
                              max_cpu_loras=config.lora.max_cpu_loras, kernel=kernel, deltas_beside=beside)
        errors = []
        for name, path in config.lora.lora_modules.items():
            if name == self.served_model_name:
                errors.append(f"{name}: an adapter cannot take the base model's name")
                continue
            try:
                log.info("loaded adapter %s", manager.load(name, path).summary())
            except AdapterError as e:
                errors.append(f"{name} ({path}): {e}")
        if errors:
            raise AdapterError("refusing to start, bad adapters:\n  " + "\n  ".join(errors))
        return manager

    def measure_pending_effects(self) -> bool:
        """Measure the effect of the start-up adapters (the async loop calls this when idle, so start-up
        does not wait for it); log each. True if any was measured. Runtime loads are measured when
        their report is first asked for, so a hot load costs only its read and checks."""
        if self.lora is None:
            return False
        pending = [k for k in self.config.lora.lora_modules if k in self.lora.entries and self.lora.entries[k].served]
        keys = self._measure_effects(pending)
        for key in keys:
            log.info("adapter %s: next-token KL vs base on the probe prompt %.4g", self.lora.name_of(key),
                     self.lora.reports[key].next_token_kl)
        return bool(keys)

    @functools.cached_property
    def probe_ids(self) -> list[int]:
        """A short, fixed probe prompt: the chat template's when there is one, as users will send."""
        chat = [{"role": "user", "content": "Tell me about yourself."}]
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
            return list(ids["input_ids"])
        if hasattr(self.tokenizer, "encode"):
            return self.tokenizer.encode("The meaning of life is")
        return list(range(1, 9))

    def _measure_effects(self, keys: list[str]) -> list[str]:
        """Measure each adapter's effect as served: the base and up to max_loras adapters answer the probe
        prompt in one packed forward of the real serving path; the report gets KL(adapter || base) of the
        next-token distribution. Only between steps, on the engine thread; adapters that find no free
        slot or KV blocks now are left unmeasured. Returns the keys measured."""
        pending = [k for k in keys if self.lora.reports[k].next_token_kl is None]
        if not pending:              # the idle loop asks often: no work, no probe to build
            return []
        ids, measured = self.probe_ids, []
        blocks_per_seq = -(-len(ids) // self.blocks.block_size)
        while pending:
            room = min(self.lora.max_loras, self.blocks.num_free // blocks_per_seq - 1)
            chunk, pending = pending[:max(room, 0)], pending[max(room, 0):]
            seqs = [Sequence("probe-base", ids, SamplingParams(max_tokens=1))]
            for key in chunk:
                try:
                    slot = self.lora.try_activate(key)
                except AdapterError:      # its files changed on disk: serving it will say so
                    slot = None
                if slot is None:
                    break
                seq = Sequence(f"probe-{key}", ids, SamplingParams(max_tokens=1), lora_name=key)
                seq.lora_slot = slot
                seqs.append(seq)
            if len(seqs) == 1:
                break
            for seq in seqs:
                self.blocks.grow(seq, len(ids))
            try:
                logits, _ = self.runner.run([(seq, len(ids)) for seq in seqs])
            finally:
                for seq in seqs:
                    self.blocks.free(seq)
                    if seq.lora_name is not None:
                        self.lora.release(seq.lora_name)
            logp = torch.log_softmax(logits.float(), dim=-1)
            for seq, row in zip(seqs[1:], logp[1:]):
                kl = torch.sum(row.exp() * (row - logp[0])).item()
                self.lora.reports[seq.lora_name].next_token_kl = max(kl, 0.0)
                measured.append(seq.lora_name)
        return measured

    def load_lora(self, name: str, path: str) -> tuple[LoadReport, bool]:
        """Serve a new adapter without a restart: the same checks and report as at start-up. Returns
        (report, created); loading a name again from the same directory changes nothing."""
        lora = self._lora()
        if name == self.served_model_name:
            raise AdapterConflict(f"{name!r} is the base model's name; an adapter needs its own")
        known = lora.served().get(name)
        if known is not None and os.path.realpath(known) == os.path.realpath(path):
            return lora.reports[lora.resolve(name)], False
        report = lora.load(name, path)
        gc.freeze()   # the new adapter is long-lived too (see AsyncEngine.start)
        log.info("loaded adapter %s", report.summary())
        return report, True

    def unload_lora(self, name: str) -> int:
        """Stop serving an adapter; returns how many requests still finish with it."""
        users = self._lora().unload(name)
        log.info("unloaded adapter %s (%d request(s) still finishing with it)", name, users)
        return users

    def lora_status(self, name: str | None = None) -> list[dict]:
        """Load reports and tiers of every adapter (or one served name), unloading ones included."""
        lora = self._lora()
        keys = sorted(lora.entries) if name is None else [lora.resolve(name)]
        if keys == [None]:
            raise UnknownModelError(name, self.model_names())
        self._measure_effects([k for k in keys if lora.entries[k].served])   # if the idle loop has not yet
        return [lora.status(key) for key in keys]

    def lora_requests(self) -> tuple[list[str], list[str]]:
        """Adapter names of running and of waiting requests (vLLM's lora_requests_info). Called from the
        metrics scrape on another thread: it reads copies of the queues, never mutates."""
        def names(seqs: list[Sequence]) -> list[str]:
            return sorted({LoRAManager.name_of(s.lora_name) for s in seqs if s.lora_name is not None})
        return names(list(self.scheduler.running)), names(list(self.scheduler.waiting))

    def _lora(self) -> LoRAManager:
        if self.lora is None:
            raise LoRANotEnabled("LoRA is not enabled on this server: start it with --enable-lora")
        return self.lora

    def _acquire_lora(self, seq: Sequence) -> bool:
        """Give a sequence its adapter's device slot; False (wait) while every slot is pinned. A
        sequence whose adapter can no longer be read is ended and reported in `failed`."""
        if seq.lora_name is None:
            return True
        try:
            slot = self.lora.try_activate(seq.lora_name)
        except AdapterError as e:
            self.seqs.pop(seq.request_id, None)
            self._finish(seq, "abort")
            self.failed.append((seq.request_id, e))
            return False
        if slot is None:
            return False
        seq.lora_slot = slot
        return True

    def _release_lora(self, seq: Sequence) -> None:
        if seq.lora_name is not None and seq.lora_slot >= 0:
            self.lora.release(seq.lora_name)
            seq.lora_slot = -1

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        if seq.lora_name is not None:
            self.lora.done(seq.lora_name)

    def model_names(self) -> list[str]:
        return [self.served_model_name] + (self.lora.names() if self.lora else [])

    def resolve_model(self, name: str | None) -> str | None:
        """Map a request's model name to its adapter's key (None = the base), or raise UnknownModelError."""
        if name is None or name == self.served_model_name:
            return None
        key = self.lora.resolve(name) if self.lora is not None else None
        if key is None:
            raise UnknownModelError(name, self.model_names())
        return key

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams, model: str | None) -> str | None:
        """Validate a request without touching engine state (safe from any thread); return its adapter
        key (None = base) or raise ValueError / RequestError / UnknownModelError with the user's message."""
        params.validate()
        if not prompt_token_ids:
            raise RequestError("the prompt is empty")
        lora_name = self.resolve_model(model)
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({len(prompt_token_ids)} in the prompt, {params.max_tokens} for the completion).")
        capacity = self.blocks.num_blocks * self.blocks.block_size
        if total > capacity:
            raise RequestError(f"the request needs {total} tokens of KV cache but the whole cache holds {capacity}")
        return lora_name

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    model: str | None = None) -> Sequence:
        lora_name = self.check_request(prompt_token_ids, params, model)
        if request_id in self.seqs:
            raise RequestError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, prompt_token_ids, params, lora_name)
        self.seqs[request_id] = seq
        if lora_name is not None:
            self.lora.use(lora_name)
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self._finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        logits, sampling = self.runner.run(batch)
        self.scheduler.commit(batch)
        if not sampling:
            return []
        tokens, logprobs = self.sampler(logits, sampling)
        outputs = []
        for seq, token, lp in zip(sampling, tokens, logprobs):
            seq.token_ids.append(token)
            new_text = self._update_text(seq)
            if seq.is_finished:
                self.seqs.pop(seq.request_id, None)
            outputs.append(RequestOutput(
                seq.request_id, seq.prompt_token_ids, seq.output_token_ids, seq.text[:seq.num_emitted_chars],
                new_text, [token], [lp] if lp is not None else None, seq.is_finished, seq.finish_reason))
        return outputs

    def _update_text(self, seq: Sequence) -> str:
        """Decode, apply stop conditions, and return the text that is safe to hand out now."""
        p, token = seq.params, seq.token_ids[-1]
        reason = None
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif len(seq) - seq.num_prompt_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            reason = "length"
        if seq.detokenizer is None:
            seq.detokenizer = Detokenizer(self.tokenizer)
        if reason is None:
            seq.text = seq.detokenizer.add(seq.token_ids, seq.num_prompt_tokens)
        else:   # a stop token ends the text, it is not part of it (some GGUF tokenizers do not mark EOS special)
            seq.text = seq.detokenizer.final(seq.output_token_ids[:-1] if reason == "stop" else seq.output_token_ids)
        safe = len(seq.text)
        for stop in p.stop:
            at = seq.text.find(stop, max(0, seq.num_emitted_chars - len(stop)))
            if at != -1 and at < safe:
                safe, reason = at, "stop"
        if reason is None:
            safe -= self._held_back(seq.text, p.stop)
        else:
            seq.text = seq.text[:safe]
            self._finish(seq, reason)
        new_text = seq.text[seq.num_emitted_chars:safe]
        seq.num_emitted_chars = max(seq.num_emitted_chars, safe)
        return new_text

    @staticmethod
    def _held_back(text: str, stops: list[str]) -> int:
        """Chars at the end of `text` not to emit yet: a partial UTF-8 character, or the start of a stop
        string, so streamed text never has to be taken back."""
        if text.endswith("\ufffd"):
            return 1
        longest = 0
        for stop in stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_total": self.blocks.num_blocks,
            "kv_blocks_free": self.blocks.num_free,
        }

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Offline helper (tests, benchmarks): run prompts to completion, return output token ids."""
        ids = [f"offline-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
        for rid, prompt in zip(ids, prompts):
            self.add_request(rid, prompt, SamplingParams(**vars(params)))
        done: dict[str, list[int]] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out.output_token_ids
        return [done[rid] for rid in ids]
