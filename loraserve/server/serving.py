"""From a validated request to engine requests, and from engine outputs back to OpenAI responses.

Everything a request can be refused for (unknown model, empty prompt, too long for the context,
bad sampling values) is checked here before the first engine request starts, so a streaming
client gets a proper 4xx status instead of an error inside a 200 stream.
"""

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from loraserve.engine.async_engine import EngineDeadError
from loraserve.engine.llm_engine import UnknownModelError
from loraserve.engine.outputs import RequestOutput, TokenLogprob
from loraserve.engine.sampling_params import SamplingParams
from loraserve.lora.adapter import AdapterError
from loraserve.server.errors import (
    AdapterUnavailable,
    APIError,
    ContextLengthExceeded,
    EngineUnavailable,
    InternalError,
    InvalidValue,
    ModelNotFound,
    NoChatTemplate,
)
from loraserve.server.metrics import ServerMetrics
from loraserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    GenerateRequest,
    GenerateResponse,
    SamplingFields,
    TopLogprob,
    Usage,
)

logger = logging.getLogger(__name__)

IsDisconnected = Callable[[], Awaitable[bool]]


class ClientDisconnected(Exception):
    """The client went away before a non-streaming answer was ready; nothing is sent back."""


@dataclass
class SubRequest:
    """One engine request: choice `index` of the response (prompt p, sample i -> p * n + i)."""
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str


@dataclass
class ChoiceState:
    """What a response choice has accumulated across engine steps."""
    text: str = ""
    num_tokens: int = 0
    logprobs: list[tuple[int, TokenLogprob]] = field(default_factory=list)   # (token id, logprob)
    finish_reason: str | None = None


def _value_error(err: ValueError) -> InvalidValue:
    """SamplingParams.validate() starts its messages with the field name; pass it on as `param`."""
    message = str(err)
    return InvalidValue(message, param=message.split(" ", 1)[0])


class OpenAIServing:
    def __init__(self, engine, metrics: ServerMetrics):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.metrics = metrics

    # ---- checks shared by every endpoint ----

    def resolve_model(self, name: str | None) -> str:
        served = self.engine.model_names()
        if name is None:
            return served[0]
        if name not in served:
            raise ModelNotFound(f"The model '{name}' does not exist. Served models: {', '.join(served)}",
                                param="model")
        return name

    def check_prompt_ids(self, ids: list[int]) -> None:
        if not ids:
            raise InvalidValue("The prompt is empty: send at least one token of prompt", param="prompt")
        vocab = len(self.tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidValue(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})",
                               param="prompt")

    def check_length(self, num_prompt_tokens: int, max_tokens: int) -> None:
        limit = self.engine.max_model_len
        if num_prompt_tokens + max_tokens > limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} "
                "for the completion). Please reduce the prompt or max_tokens.", param="max_tokens")

    def sub_requests(self, req: SamplingFields, model: str, prompts: list[list[int]], max_tokens: list[int],
                     logprobs: int | None, prefix: str) -> list[SubRequest]:
        """Validate everything, then expand prompts x n into engine requests. The engine's own
        check (e.g. the whole KV cache too small for the request) runs here too, so that it also
        reaches a streaming client as a 4xx status."""
        try:
            req.check_n()
            params = [req.sampling_params(max_tokens[p], logprobs, i)
                      for p in range(len(prompts)) for i in range(req.n)]
        except ValueError as err:
            raise _value_error(err) from None
        for ids, m in zip(prompts, max_tokens):
            self.check_prompt_ids(ids)
            self.check_length(len(ids), m)
        subs = [SubRequest(k, prompts[k // req.n], p, f"{prefix}-{k}") for k, p in enumerate(params)]
        try:
            for sub in subs[::req.n]:      # the n samples of a prompt differ only in their seed
                self.engine.engine.check_request(sub.prompt_token_ids, sub.params, model)
        except UnknownModelError as err:
            raise ModelNotFound(str(err), param="model") from None
        except ValueError as err:
            raise InvalidValue(str(err)) from None
        return subs

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if not req.messages:
            raise InvalidValue("messages is empty: send at least one message", param="messages")
        if not self.tokenizer.chat_template:
            raise NoChatTemplate("This model's tokenizer has no chat template; use /v1/completions")
        messages = [m.template_dict() for m in req.messages]
        try:
            return list(self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        except Exception as err:   # jinja errors from the model's own template (e.g. role order)
            raise InvalidValue(f"The chat template refused these messages: {err}", param="messages") from None

    def token_str(self, token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else self.tokenizer.decode([token_id])

    # ---- running engine requests ----

    async def _tracked(self, sub: SubRequest, model: str) -> AsyncIterator[RequestOutput]:
        """Run one engine request; record its metrics however it ends. Closing this generator
        closes the engine's, which aborts the request and frees its KV blocks."""
        start, first, last, reason = time.monotonic(), None, None, "abort"
        try:
            async with aclosing(self.engine.generate(sub.prompt_token_ids, sub.params, model=model,
                                                     request_id=sub.request_id)) as outputs:
                async for out in outputs:
                    if first is None and out.new_token_ids:
                        first = time.monotonic()
                    last = out
                    if out.finished:
                        reason = out.finish_reason or "stop"
                    yield out
        except UnknownModelError as err:     # e.g. an adapter unloaded after the request was checked
            raise ModelNotFound(str(err), param="model") from err
        except ValueError as err:            # the engine's own checks (RequestError, SamplingParams)
            raise InvalidValue(str(err)) from err
        except EngineDeadError as err:
            raise EngineUnavailable(str(err)) from err
        except AdapterError as err:          # evicted from host memory, and its files changed since
            raise AdapterUnavailable(str(err), param="model") from err
        finally:
            num_out = len(last.output_token_ids) if last is not None else 0
            lora_name = None if model == self.engine.served_model_name else model
            self.metrics.record_finished(len(sub.prompt_token_ids), num_out, reason,
                                         None if first is None else first - start, time.monotonic() - start,
                                         lora_name)

    async def run(self, subs: list[SubRequest], model: str) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of all engine requests as they come, tagged with their choice index."""
        if len(subs) == 1:
            async with aclosing(self._tracked(subs[0], model)) as outputs:
                async for out in outputs:
                    yield subs[0].index, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(sub: SubRequest) -> None:
            try:
                async with aclosing(self._tracked(sub, model)) as outputs:
                    async for out in outputs:
                        queue.put_nowait((sub.index, out))
                queue.put_nowait((sub.index, None))
            except Exception as err:   # handed to the consumer, which raises it
                queue.put_nowait((sub.index, err))

        tasks = [asyncio.create_task(pump(sub)) for sub in subs]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self, subs: list[SubRequest], model: str,
                      is_disconnected: IsDisconnected) -> list[ChoiceState]:
        """Run to the end for a non-streaming answer; abort everything if the client leaves."""
        states = [ChoiceState() for _ in subs]
        async with aclosing(self.run(subs, model)) as outputs:
            async for index, out in outputs:
                _accumulate(states[index], out)
                if await is_disconnected():
                    raise ClientDisconnected()
        return states

    # ---- /v1/completions ----

    def prepare_completion(self, req: CompletionRequest, response_id: str) -> tuple[str, list[SubRequest]]:
        model = self.resolve_model(req.model)
        prompts = [self.encode(p) if isinstance(p, str) else list(p) for p in req.prompts()]
        if not prompts:
            raise InvalidValue("The prompt is empty: send at least one token of prompt", param="prompt")
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise InvalidValue(f"logprobs must be in [0, 20], got {req.logprobs}", param="logprobs")
        subs = self.sub_requests(req, model, prompts, [req.max_tokens] * len(prompts), req.logprobs, response_id)
        return model, subs

    def completion_logprobs(self, items: list[tuple[int, TokenLogprob]], as_ids: bool,
                            offset: int) -> CompletionLogprobs:
        """OpenAI's legacy logprobs: the chosen token always sits in its top dict (vLLM does the same)."""
        out = CompletionLogprobs()
        for token_id, lp in items:
            token = self.token_str(token_id, as_ids)
            top = {self.token_str(t, as_ids): v for t, v in lp.top}
            top.setdefault(token, lp.logprob)
            out.tokens.append(token)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(token)
        return out

    def completion_response(self, req: CompletionRequest, model: str, subs: list[SubRequest],
                            states: list[ChoiceState], response_id: str) -> CompletionResponse:
        choices = [CompletionChoice(
            index=i, text=s.text, finish_reason=s.finish_reason,
            logprobs=None if req.logprobs is None else self.completion_logprobs(
                s.logprobs, req.return_tokens_as_token_ids, 0))
            for i, s in enumerate(states)]
        return CompletionResponse(id=response_id, model=model, choices=choices,
                                  usage=_usage(subs, states, req.n))

    async def completion_stream(self, req: CompletionRequest, model: str, subs: list[SubRequest],
                                response_id: str) -> AsyncIterator[str]:
        states = [ChoiceState() for _ in subs]
        offsets = [0] * len(subs)
        created = int(time.time())
        try:
            async with aclosing(self.run(subs, model)) as outputs:
                async for index, out in outputs:
                    state = states[index]
                    seen = len(state.logprobs)
                    _accumulate(state, out)
                    new_lps = state.logprobs[seen:]
                    if not (out.new_text or out.finished or (req.logprobs is not None and new_lps)):
                        continue
                    logprobs = None
                    if req.logprobs is not None:
                        logprobs = self.completion_logprobs(new_lps, req.return_tokens_as_token_ids,
                                                            offsets[index])
                        offsets[index] += sum(len(t) for t in logprobs.tokens)
                    choice = CompletionChoice(index=index, text=out.new_text, logprobs=logprobs,
                                              finish_reason=state.finish_reason)
                    yield _sse(CompletionResponse(id=response_id, created=created, model=model,
                                                  choices=[choice]))
            if req.include_usage:
                yield _sse(CompletionResponse(id=response_id, created=created, model=model, choices=[],
                                              usage=_usage(subs, states, req.n)))
        except Exception as err:
            yield _sse_error(err)
        yield "data: [DONE]\n\n"

    # ---- /v1/chat/completions ----

    def prepare_chat(self, req: ChatCompletionRequest, response_id: str) -> tuple[str, list[SubRequest]]:
        model = self.resolve_model(req.model)
        try:
            logprobs = req.logprobs_k()
        except ValueError as err:
            raise InvalidValue(str(err), param="top_logprobs") from None
        ids = self.chat_prompt(req)
        max_tokens = req.requested_max_tokens()
        if max_tokens is not None and max_tokens < 1:
            name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            raise InvalidValue(f"{name} must be at least 1, got {max_tokens}", param=name)
        if max_tokens is None:
            # OpenAI's default: as long as the context allows.
            max_tokens = self.engine.max_model_len - len(ids)
            if max_tokens < 1:
                self.check_length(len(ids), 1)
        subs = self.sub_requests(req, model, [ids], [max_tokens], logprobs, response_id)
        return model, subs

    def chat_logprobs(self, items: list[tuple[int, TokenLogprob]], as_ids: bool) -> ChatLogprobs:
        def entry(token_id: int, logprob: float) -> TopLogprob:
            token = self.token_str(token_id, as_ids)
            return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))

        content = []
        for token_id, lp in items:
            chosen = entry(token_id, lp.logprob)
            content.append(ChatTokenLogprob(**chosen.model_dump(),
                                            top_logprobs=[entry(t, v) for t, v in lp.top]))
        return ChatLogprobs(content=content)

    def chat_response(self, req: ChatCompletionRequest, model: str, subs: list[SubRequest],
                      states: list[ChoiceState], response_id: str) -> ChatCompletionResponse:
        choices = [ChatChoice(
            index=i, message=AssistantMessage(content=s.text), finish_reason=s.finish_reason,
            logprobs=self.chat_logprobs(s.logprobs, req.return_tokens_as_token_ids) if req.logprobs else None)
            for i, s in enumerate(states)]
        return ChatCompletionResponse(id=response_id, model=model, choices=choices,
                                      usage=_usage(subs, states, req.n))

    async def chat_stream(self, req: ChatCompletionRequest, model: str, subs: list[SubRequest],
                          response_id: str) -> AsyncIterator[str]:
        states = [ChoiceState() for _ in subs]
        created = int(time.time())

        def chunk(choices: list[ChatStreamChoice], usage: Usage | None = None) -> str:
            return _sse(ChatCompletionChunk(id=response_id, created=created, model=model, choices=choices,
                                            usage=usage))

        try:
            for sub in subs:
                yield chunk([ChatStreamChoice(index=sub.index, delta=ChatDelta(role="assistant", content=""))])
            async with aclosing(self.run(subs, model)) as outputs:
                async for index, out in outputs:
                    state = states[index]
                    seen = len(state.logprobs)
                    _accumulate(state, out)
                    new_lps = state.logprobs[seen:]
                    if not (out.new_text or out.finished or (req.logprobs and new_lps)):
                        continue
                    logprobs = self.chat_logprobs(new_lps, req.return_tokens_as_token_ids) if req.logprobs else None
                    yield chunk([ChatStreamChoice(index=index, delta=ChatDelta(content=out.new_text),
                                                  logprobs=logprobs, finish_reason=state.finish_reason)])
            if req.include_usage:
                yield chunk([], _usage(subs, states, req.n))
        except Exception as err:
            yield _sse_error(err)
        yield "data: [DONE]\n\n"

    # ---- POST /generate ----

    def prepare_generate(self, req: GenerateRequest, response_id: str) -> tuple[str, list[SubRequest]]:
        model = self.resolve_model(req.model)
        ids = self.encode(req.prompt)
        return model, self.sub_requests(req, model, [ids], [req.max_tokens], None, response_id)

    def generate_response(self, req: GenerateRequest, subs: list[SubRequest],
                          states: list[ChoiceState]) -> GenerateResponse:
        """vLLM's demo-server shape: each text is the prompt followed by its completion."""
        return GenerateResponse(text=[req.prompt + s.text for s in states], usage=_usage(subs, states, req.n))


def _accumulate(state: ChoiceState, out: RequestOutput) -> None:
    state.text = out.text
    state.num_tokens = len(out.output_token_ids)
    if out.new_logprobs is not None:
        state.logprobs.extend(zip(out.new_token_ids, out.new_logprobs))
    if out.finished:
        state.finish_reason = out.finish_reason


def _usage(subs: list[SubRequest], states: list[ChoiceState], n: int) -> Usage:
    """True token counts: each prompt once (its n samples share it, as OpenAI counts), every
    generated token of every choice."""
    prompt = sum(len(sub.prompt_token_ids) for sub in subs[::n])
    return Usage.of(prompt, sum(s.num_tokens for s in states))


def _sse(payload) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def _sse_error(err: Exception) -> str:
    """A failure after the 200 headers went out can only be reported inside the stream."""
    if not isinstance(err, APIError):
        logger.exception("error while streaming")
        err = InternalError(f"Internal server error: {type(err).__name__}: {err}")
    return f"data: {json.dumps(err.body())}\n\n"
