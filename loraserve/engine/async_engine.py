"""The async face of the engine: the step loop runs on its own thread (torch releases the GIL in its
kernels, so HTTP handling overlaps compute) and hands each request's outputs to an asyncio queue.

All engine state is touched by the loop thread only: the event loop sends it adds, aborts and
adapter loads / unloads through a thread-safe inbox, drained between steps, so an adapter is never
placed or freed in the middle of a forward pass."""

import asyncio
import gc
import logging
import os
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loraserve.config import EngineConfig
from loraserve.engine.llm_engine import LLMEngine
from loraserve.engine.outputs import RequestOutput
from loraserve.engine.sampling_params import SamplingParams
from loraserve.lora.manager import LoadReport

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The step loop is not running; requests cannot be served."""


class AsyncEngine:
    def __init__(self, config: EngineConfig, model: PreTrainedModel | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None):
        self.engine = LLMEngine(config, model, tokenizer)
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.served_model_name = self.engine.served_model_name
        self._inbox: queue.Queue = queue.Queue()
        self._wakeup = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._measuring = True
        self._loop: asyncio.AbstractEventLoop | None = None

    def model_names(self) -> list[str]:
        return self.engine.model_names()

    def stats(self) -> dict:
        return self.engine.stats()

    async def start(self) -> None:
        # The model, tokenizer and adapters are long-lived: keep them out of the cyclic GC's scans,
        # whose full passes over them otherwise pause the engine for ~0.2 s (measured with 20 adapters).
        gc.freeze()
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="loraserve-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, model: str | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs step by step; closing the iterator early aborts the request
        and frees its KV blocks. Bad requests raise before anything is queued."""
        if self._thread is None:
            raise EngineDeadError("the engine loop is not running")
        self.engine.check_request(prompt_token_ids, params, model)
        request_id = request_id or uuid.uuid4().hex
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._send(("add", request_id, prompt_token_ids, params, model))
        finished = False
        try:
            while not finished:
                out = await stream.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    async def load_lora_adapter(self, name: str, path: str) -> tuple[LoadReport, bool]:
        """Serve a new adapter (see LLMEngine.load_lora); it is read and placed on the loop thread."""
        return await self._call(self.engine.load_lora, name, path)

    async def unload_lora_adapter(self, name: str) -> int:
        """Stop serving an adapter; returns how many requests still finish with it."""
        return await self._call(self.engine.unload_lora, name)

    async def lora_status(self, name: str | None = None) -> list[dict]:
        return await self._call(self.engine.lora_status, name)

    async def _call(self, fn: Callable, *args) -> Any:
        """Run `fn(*args)` on the loop thread between two steps and return (or raise) its result."""
        if self._thread is None or self._stopping:
            raise EngineDeadError("the engine loop is not running")
        future = self._loop.create_future()
        self._send(("call", fn, args, future))
        return await future

    def _settle(self, future: asyncio.Future, result: Any, error: BaseException | None) -> None:
        if future.done():          # the caller went away
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def _send(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wakeup.set()

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(item)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._deliver(out.request_id, out)

    def _publish(self, request_id: str, item) -> None:
        self._loop.call_soon_threadsafe(self._deliver, request_id, item)

    def _pending_messages(self) -> Iterator[tuple]:
        """Take the inbox's messages, oldest first, until it is empty."""
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drain_inbox(self) -> None:
        for message in self._pending_messages():
            if message[0] == "abort":
                self.engine.abort(message[1])
                continue
            if message[0] == "call":
                _, fn, args, future = message
                result, error = None, None
                try:
                    result = fn(*args)
                except Exception as e:
                    error = e
                self._loop.call_soon_threadsafe(self._settle, future, result, error)
                continue
            _, request_id, prompt, params, model = message
            try:
                self.engine.add_request(request_id, prompt, params, model)
            except Exception as e:   # checked before queueing, but state may have changed since
                self._publish(request_id, e)

    @property
    def is_running(self) -> bool:
        """True while the step loop thread is alive (what /health reports)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def _measure_when_idle(self) -> bool:
        if not self._measuring:
            return False
        try:
            return self.engine.measure_pending_effects()
        except Exception:
            # A measurement is a nicety: it must never stop the loop. Report it once, then stop trying.
            log.exception("measuring adapters' effect failed; load reports will not carry it")
            self._measuring = False
            return False

    def _run(self) -> None:
        threads = self.engine.config.num_threads
        if threads is not None:
            torch.set_num_threads(threads)
            log.info("engine loop threads: %d of %d cores", threads, len(os.sched_getaffinity(0)))
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_unfinished():
                if self._inbox.empty() and self._measure_when_idle():
                    continue              # idle: adapters' load reports got their measured effect
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:
                # A failed step must not take the server down: fail the requests in it, keep serving.
                log.exception("engine step failed; aborting the running requests")
                for request_id in list(self.engine.seqs):
                    self.engine.abort(request_id)
                    self._publish(request_id, RuntimeError(f"engine step failed: {e}"))
                continue
            if outputs:   # one wake-up of the event loop per step, not one per request
                self._loop.call_soon_threadsafe(self._deliver_step, outputs)
            while self.engine.failed:
                self._publish(*self.engine.failed.pop())
        self._fail_calls()

    def _fail_calls(self) -> None:
        """The loop is stopping: answer what it will not run, so no caller waits forever."""
        dead = EngineDeadError("the engine loop stopped")
        for message in self._pending_messages():
            if message[0] == "call":
                self._loop.call_soon_threadsafe(self._settle, message[3], None, dead)
            elif message[0] == "add":
                self._publish(message[1], dead)
