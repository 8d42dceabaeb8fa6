"""The FastAPI app: OpenAI-compatible routes over one AsyncEngine.

`build_app` takes a ready engine and starts / stops its step loop with the app's lifespan, so the
CLI, tests and embedding applications all run the same app object under any ASGI server.
"""

import secrets
import uuid
from collections.abc import Sequence
from contextlib import asynccontextmanager

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.types import Send

from loraserve import __version__
from loraserve.server.errors import AuthenticationFailed, from_validation_error, install_error_handlers
from loraserve.server.lora_admin import LoRAAdmin
from loraserve.server.metrics import ServerMetrics
from loraserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    UnloadLoRAAdapterRequest,
)
from loraserve.server.serving import ClientDisconnected, OpenAIServing

# Sent instead of a body when the client left before a non-streaming answer was ready (nginx's code).
_CLIENT_CLOSED = 499


class _SSEResponse(StreamingResponse):
    """Closes the event generator however the response ends. Starlette cancels the sending task
    when the client disconnects and may leave the generator suspended; closing it here aborts the
    engine requests at once rather than whenever the garbage collector gets to it."""

    def __init__(self, events):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


async def _parse(request: Request, schema: type[BaseModel]) -> BaseModel:
    try:
        return schema.model_validate_json(await request.body())
    except ValidationError as err:
        raise from_validation_error(err) from None


def _key_checker(api_key: str):
    expected = f"Bearer {api_key}".encode()

    async def check_key(request: Request) -> None:
        header = request.headers.get("authorization")
        if header is None:
            raise AuthenticationFailed("Missing API key: send the header 'Authorization: Bearer <key>'")
        if not secrets.compare_digest(header.encode(), expected):
            raise AuthenticationFailed("Invalid API key")

    return check_key


def build_app(engine, api_key: str | None = None, allow_runtime_lora: bool = False,
              lora_roots: Sequence[str] = ()) -> FastAPI:
    """An app serving `engine`. With `api_key`, every route but /health, /version and /metrics
    needs `Authorization: Bearer <api_key>` (as vLLM does: probes and scrapers carry no key).
    `allow_runtime_lora` opens vLLM's load / unload endpoints, for directories under `lora_roots`."""
    metrics = ServerMetrics(engine, engine.served_model_name)
    serving = OpenAIServing(engine, metrics)
    admin = LoRAAdmin(engine, allow_runtime_lora, lora_roots)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="loraserve", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    public = APIRouter()
    keyed = APIRouter(dependencies=[Depends(_key_checker(api_key))] if api_key else [])

    @public.get("/health")
    async def health() -> Response:
        # 503 once the engine loop is gone, so an orchestrator restarts the container.
        return Response(status_code=200 if engine.is_running else 503)

    @public.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @public.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @keyed.get("/v1/models")
    async def list_models() -> JSONResponse:
        base, llm = engine.served_model_name, engine.engine
        adapters = llm.lora.served() if llm.lora is not None else {}
        cards = [ModelCard(id=base, root=llm.config.model, max_model_len=engine.max_model_len)]
        cards += [ModelCard(id=name, root=path, parent=base, max_model_len=engine.max_model_len)
                  for name, path in sorted(adapters.items())]
        return JSONResponse(ModelList(data=cards).model_dump())

    @keyed.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> JSONResponse:
        req = await _parse(request, LoadLoRAAdapterRequest)
        return JSONResponse(await admin.load(req))

    @keyed.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> JSONResponse:
        req = await _parse(request, UnloadLoRAAdapterRequest)
        return JSONResponse(await admin.unload(req))

    @keyed.get("/v1/adapters")
    async def list_adapters() -> JSONResponse:
        return JSONResponse({"object": "list", "data": await admin.status()})

    @keyed.get("/v1/adapters/{name:path}")
    async def get_adapter(name: str) -> JSONResponse:
        (status,) = await admin.status(name)
        return JSONResponse(status)

    async def answer(request: Request, subs: list, model: str, stream, respond) -> Response:
        """Stream the SSE body, or wait for every choice (aborting them if the client leaves)."""
        if stream is not None:
            return _SSEResponse(stream)
        try:
            states = await serving.collect(subs, model, request.is_disconnected)
        except ClientDisconnected:
            return Response(status_code=_CLIENT_CLOSED)
        return JSONResponse(respond(states).model_dump())

    @keyed.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await _parse(request, CompletionRequest)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        model, subs = serving.prepare_completion(req, response_id)
        stream = serving.completion_stream(req, model, subs, response_id) if req.stream else None
        return await answer(request, subs, model, stream,
                            lambda states: serving.completion_response(req, model, subs, states, response_id))

    @keyed.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await _parse(request, ChatCompletionRequest)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        model, subs = serving.prepare_chat(req, response_id)
        stream = serving.chat_stream(req, model, subs, response_id) if req.stream else None
        return await answer(request, subs, model, stream,
                            lambda states: serving.chat_response(req, model, subs, states, response_id))

    @keyed.post("/generate")
    async def generate(request: Request) -> Response:
        req = await _parse(request, GenerateRequest)
        model, subs = serving.prepare_generate(req, f"gen-{uuid.uuid4().hex}")
        return await answer(request, subs, model, None, lambda states: serving.generate_response(req, subs, states))

    app.include_router(public)
    app.include_router(keyed)
    return app
