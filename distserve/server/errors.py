"""Every failure leaves the server as `{"error": {message, type, param, code}}`, OpenAI's shape.

Client mistakes are 4xx with a message that names the bad value; only our own bugs are 500.
FastAPI's 422 for a body that does not validate becomes a 400, as OpenAI and vLLM answer.
"""
from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from distserve.engine.async_engine import EngineDeadError, RequestFailed

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error",
          404: "invalid_request_error", 405: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error",
          500: "internal_server_error", 503: "service_unavailable"}


RETRY_AFTER_S = "5"   # seconds a client should wait after a 503 (an instance restarts in about that)


class APIError(Exception):
    """Raised anywhere in a handler to answer with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_value" if param else None, param)


def error_body(status: int, message: str, code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.code, err.param),
                        status_code=err.status, headers=err.headers)


def sse_error(err: APIError) -> str:
    """An error met after a stream has started goes out as one more SSE event."""
    return f"data: {json.dumps(error_body(err.status, err.message, err.code, err.param))}\n\n"


def as_api_error(exc: BaseException) -> APIError:
    """Maps what the engine side raises to the status a client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"the engine is not available: {exc}", "engine_unavailable",
                        headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(exc, RequestFailed):   # ours, and this request's alone: logged where it arose
        return APIError(500, str(exc), "internal_error")
    log.error("internal error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", "internal_error")


# pydantic names the member of a union that failed (str, list[int], TextPart) in the path
_TYPE_TAG = re.compile(r"^(str|int|float|bool|function-\w+|\w*\[.*\]|[A-Z]\w*)$")


def _path(error: dict) -> list[str]:
    return [str(x) for x in error.get("loc", ()) if x != "body" and not _TYPE_TAG.match(str(x))]


def _field(error: dict) -> str | None:
    path = _path(error)
    return path[0] if path else None


def _describe(errors: list[dict]) -> str:
    """One line per bad field, from its most specific error (unions report every member)."""
    best: dict[str | None, dict] = {}
    for e in errors:
        if e.get("type") == "json_invalid":
            return f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})"
        if isinstance(e.get("input"), (bytes, bytearray)):
            return "the body must be a JSON object sent with Content-Type: application/json"
        if e.get("type") == "missing" and not _path(e):
            return "the request has no body; send a JSON object"
        name = _field(e)
        if name not in best or len(e.get("loc", ())) > len(best[name].get("loc", ())):
            best[name] = e
    parts = [f"{'.'.join(_path(e)) or 'body'}: {e.get('msg', 'invalid value')} "
             f"(got {type(e.get('input')).__name__})" for e in best.values()]
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = list(exc.errors())
        param = _field(errors[0]) if errors and errors[0].get("type") != "json_invalid" else None
        return error_response(APIError(400, _describe(errors), "invalid_request", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        code = "request_too_large" if exc.status_code == 413 else None
        return error_response(APIError(exc.status_code, message, code, None,
                                       dict(exc.headers) if exc.headers else None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return error_response(as_api_error(exc))
