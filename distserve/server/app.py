"""The FastAPI app: OpenAI routes over an EngineClient, plus /health and /metrics.

`build_app(client)` is all a caller needs; the app owns no engine and starts no threads, so
tests can serve it in-process and the disaggregated controller can sit behind it unchanged.
"""
from __future__ import annotations

import itertools
import json
import re
import secrets
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from distserve.engine.async_engine import EngineClient
from distserve.server.admission import DEFAULT_MAX_QUEUED, Admission
from distserve.server.errors import RETRY_AFTER_S, APIError, error_body, install_error_handlers
from distserve.server.generation import ClientGone, cancel_on_disconnect
from distserve.server.metrics import CONTENT_TYPE, ServerMetrics
from distserve.server.prompts import PromptEncoder
from distserve.server.protocol import ChatCompletionRequest, CompletionRequest, model_card
from distserve.server.serving_chat import ChatService
from distserve.server.serving_completion import CompletionService
from distserve.server.slo import SLOWindow

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
DEFAULT_MAX_BODY_BYTES = 4 << 20  # nginx's default is 1 MiB; a full 128k-token prompt fits


def build_app(client: EngineClient, served_model_name: str | None = None,
              api_key: str | None = None, slo: SLOWindow | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              max_queued_requests: int | None = DEFAULT_MAX_QUEUED,
              reject_late: bool = False, plan_monitor=None,
              model_root: str | None = None) -> FastAPI:
    """plan_monitor: a server.plan_monitor.PlanMonitor (under `serve --plan`): /metrics then
    sets the plan's predictions beside what is observed, and GET /v1/observed_workload
    gives the recent lengths and rate to `distserve plan --from-metrics`. model_root: where
    the weights and tokenizer are (the model argument), shown as `root` in /v1/models, where
    clients such as `vllm bench serve` load the tokenizer from (as vLLM serves it)."""
    name = served_model_name or client.model_name
    created = int(time.time())
    metrics = ServerMetrics(name, slo, plan_monitor)
    encoder = PromptEncoder(client.tokenizer, client.max_model_len)
    if reject_late and slo is None:
        raise ValueError("--reject-late needs a TTFT SLO: give --ttft-slo and --tpot-slo (or a --plan)")
    admission = Admission(max_queued_requests, slo.ttft_slo if reject_late else None)
    completion = CompletionService(client, name, metrics, encoder, admission)
    chat = ChatService(client, name, metrics, encoder, admission)
    seq = itertools.count()  # keeps engine ids unique when clients reuse an X-Request-Id

    app = FastAPI(title="distserve", docs_url=None, redoc_url=None)
    app.state.client = client
    app.state.metrics = metrics
    app.state.encoder = encoder
    app.state.admission = admission
    install_error_handlers(app)
    app.add_middleware(RequestContext, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    def check_model(model: str | None) -> None:
        if model is not None and model != name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                           f"{name!r}", "model_not_found", "model")

    def ids(request: Request) -> tuple[str, str]:
        """(engine id prefix, X-Request-Id): the client's id, made unique per request."""
        base = request.scope["state"]["request_id"]
        return f"{base}-{next(seq)}", base

    @app.get("/health")
    async def health():
        """200 {"status": "ok"}, or "degraded" with the instances that are missing while
        every role still serves; 503 when it cannot serve."""
        detail = client.health() if hasattr(client, "health") else {"status": "ok"}
        if not client.is_healthy:
            raise APIError(503, f"the engine is not running ({detail})", "engine_unavailable",
                           headers={"Retry-After": RETRY_AFTER_S})
        return JSONResponse(detail)

    @app.get("/metrics")
    async def prometheus_metrics():
        instances = client.instance_stats() if hasattr(client, "instance_stats") else None
        counts = {**(client.counts() if hasattr(client, "counts") else {}),
                  "requests_rejected_busy": admission.num_rejected,
                  "requests_rejected_late": admission.num_rejected_late}
        up = client.health().get("instances") if hasattr(client, "health") else None
        up = {iid: state == "up" for iid, state in (up or {}).items()}
        return Response(metrics.render(client.stats(), instances, counts, up),
                        media_type=CONTENT_TYPE)

    @app.get("/v1/observed_workload")
    async def observed_workload():
        if plan_monitor is None:
            raise APIError(404, "this server runs no plan: start it with --plan to observe "
                           "its workload against one", "not_found")
        return plan_monitor.observed_workload()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(name, client.max_model_len, created, model_root)]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        engine_id, base = ids(request)
        choices, prompts = await completion.start(body, engine_id)
        response_id = f"cmpl-{base}"
        if body.stream:
            return completion.stream_response(body, choices, prompts, response_id)
        try:
            return await cancel_on_disconnect(
                request.receive, completion.full(body, choices, prompts, response_id))
        finally:
            await choices.close()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        engine_id, base = ids(request)
        choices, prompt_tokens = await chat.start(body, engine_id)
        response_id = f"chatcmpl-{base}"
        if body.stream:
            return chat.stream_response(body, choices, prompt_tokens, response_id)
        try:
            return await cancel_on_disconnect(
                request.receive, chat.full(body, choices, prompt_tokens, response_id))
        finally:
            await choices.close()

    return app


class RequestContext:
    """Pure ASGI middleware: the request id (X-Request-Id, echoed) and the API key.

    The key is checked here, before the body is parsed, so a client without one learns that
    first; /health and /metrics stay open, as in vLLM. A pure ASGI middleware (not
    BaseHTTPMiddleware) leaves streaming and disconnect notices untouched.
    """

    def __init__(self, app, api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "").strip()
        if given and not _REQUEST_ID.fullmatch(given):
            return await _reply(send, 400, "X-Request-Id must be 1-128 characters of "
                                "letters, digits and . _ : -", "invalid_request_id")
        if self.api_key is not None and scope["path"].startswith("/v1"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(
                    token.strip().encode(), self.api_key.encode()):
                return await _reply(send, 401, "missing or wrong API key (send "
                                    "'Authorization: Bearer KEY')", "invalid_api_key",
                                    [(b"www-authenticate", b"Bearer")])
        too_large = APIError(413, f"the request body is larger than this server's limit of "
                             f"{self.max_body_bytes} bytes", "request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _reply(send, too_large.status, too_large.message, too_large.code)
        request_id = given or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        received = 0

        async def capped_receive():
            """Counts what arrives, for bodies sent without (or under) a Content-Length."""
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, too_large.message)  # FastAPI re-raises these
            return message

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, capped_receive, send_with_id)


async def _reply(send, status: int, message: str, code: str, extra=()) -> None:
    body = json.dumps(error_body(status, message, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})
