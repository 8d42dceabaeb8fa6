"""Errors a client can see, each its own type carrying the message the user will read.

Bodies follow OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so the official
clients raise their matching exception (`BadRequestError`, `NotFoundError`, ...) with our message.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraserve.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)


class APIError(Exception):
    status_code = 400
    type = "invalid_request_error"
    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> dict:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code)


class InvalidJSON(APIError):
    code = "invalid_json"


class InvalidType(APIError):
    code = "invalid_type"


class UnsupportedField(APIError):
    code = "unsupported_field"


class InvalidValue(APIError):
    code = "invalid_value"


class ContextLengthExceeded(APIError):
    code = "context_length_exceeded"


class NoChatTemplate(APIError):
    code = "no_chat_template"


class ModelNotFound(APIError):
    status_code = 404
    code = "model_not_found"


class AuthenticationFailed(APIError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class AdapterRefused(APIError):
    """An adapter that cannot be applied exactly (bad files, unsupported option, ...): the load failed."""
    code = "invalid_adapter"


class AdapterNotFound(APIError):
    status_code = 404
    code = "adapter_not_found"


class AdapterNameConflict(APIError):
    """A load under a name already served from another directory, or the base model's name."""
    status_code = 409
    code = "adapter_name_conflict"


class RuntimeLoRADisabled(APIError):
    """Loading and unloading adapters while serving is not switched on for this server."""
    status_code = 403
    type = "permission_error"
    code = "runtime_lora_disabled"


class LoRAPathForbidden(APIError):
    """A lora_path outside every --lora-root (`..`, another absolute path, a symlink leaving a root)."""
    status_code = 403
    type = "permission_error"
    code = "lora_path_forbidden"


class AdapterUnavailable(APIError):
    """A served adapter that could not be re-read from disk for this request (its files changed)."""
    status_code = 503
    type = "service_unavailable"
    code = "adapter_unavailable"


class RouteError(APIError):
    """A path or method the server does not have (404 / 405 from routing)."""
    code = "invalid_route"

    def __init__(self, message: str, status_code: int):
        super().__init__(message)
        self.status_code = status_code


class EngineUnavailable(APIError):
    """The engine's step loop is not running (shutting down, or never started)."""
    status_code = 503
    type = "service_unavailable"
    code = "engine_unavailable"


class InternalError(APIError):
    status_code = 500
    type = "internal_error"
    code = "internal_error"


def _loc(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def from_validation_error(err: ValidationError) -> APIError:
    """Turn pydantic's report into one client error: an unknown field is named as unsupported
    first, since fixing a type elsewhere would still leave the request refused."""
    errors = err.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return InvalidJSON(f"Request body is not valid JSON: {errors[0]['msg']}")
    extra = [_loc(e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        names = ", ".join(f"'{name}'" for name in extra)
        return UnsupportedField(
            f"Unsupported field(s): {names}. loraserve does not implement them and will not "
            "answer as if they were honoured; remove them from the request.", param=extra[0])
    parts = []
    for e in errors[:3]:
        where = _loc(e["loc"])
        parts.append(f"'{where}': {e['msg']}" if where else e["msg"])
    param = _loc(errors[0]["loc"][:1]) or None
    return InvalidType("Invalid request: " + "; ".join(parts), param=param)


async def _api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _http_exception_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return RouteError(f"{request.method} {request.url.path}: {exc.detail}", exc.status_code).response()


async def _unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return InternalError(f"Internal server error: {type(exc).__name__}: {exc}").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(Exception, _unhandled_handler)
