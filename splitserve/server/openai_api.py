"""The OpenAI-compatible HTTP API over a conductor.

    POST /v1/completions, POST /v1/chat/completions   (JSON, or SSE with "stream": true)
    GET  /v1/models                                   the one served model
    GET  /health                                      conductor.health(); 503 while starting, and
                                                      with status "draining" after SIGTERM
    GET  /metrics                                     Prometheus text format
    POST /admin/role  {"worker_id", "role", "reason"?} change a --reroleable worker's role while
                                                      serving (conductor.set_role); the record
    GET  /admin/roles                                 the role changes so far, and the planner's
                                                      decisions when it runs

Every error is OpenAI's JSON `{"error": {"message", "type", "param", "code"}}`, never a traceback:
    400 invalid_request_error  bad JSON, wrong type, value out of range, missing field, prompt too
                               long, anything the conductor or SamplingParams refuse
    401 invalid_api_key        api_key set and `Authorization: Bearer <key>` missing or wrong
                               (/v1/* and /admin/*: health checks and scrapers need no key)
    404 model_not_found        `model` given and not the served name
    413 request_too_large      a body over max_body_bytes (body_limit.py), refused unparsed
    503                        no workers yet (or none able to serve); serve is draining (SIGTERM:
                               every /v1/* request, before its body is read); a request still
                               running when the drain timed out (drain.py)
    500 server_error           a worker died or a KV transfer timed out mid-request
"""

from __future__ import annotations

import hmac
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from splitserve.errors import SplitServeError
from splitserve.server.body_limit import DEFAULT_MAX_BODY_BYTES, BodyLimitMiddleware
from splitserve.server.completions import Generation, MsgspecJSONResponse, error_for
from splitserve.server.metrics import ApiMetrics
from splitserve.server.schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
)

log = logging.getLogger(__name__)


def build_app(conductor, served_model_name: str, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="splitserve", summary="OpenAI-compatible disaggregated LLM serving")
    metrics = ApiMetrics(conductor)
    t_started = int(time.time())
    # innermost: the checks outside it refuse without reading the body
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.state.conductor, app.state.metrics = conductor, metrics
    app.state.draining = False  # set by serve's SIGTERM (drain.py); never cleared
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(DrainingMiddleware, state=app.state)  # outermost: refuses before the key
    _install_error_handlers(app)

    async def generation(request: Request, body, chat: bool) -> Response:
        if body.model is not None and body.model != served_model_name:
            raise ApiError(404, f"The model `{body.model}` does not exist. This server serves "
                           f"`{served_model_name}`.", param="model", code="model_not_found")
        if not conductor.is_ready():
            raise ApiError(503, f"{conductor.unready_reason()} Retry shortly.",
                           type="service_unavailable_error")
        return await Generation(conductor, metrics, served_model_name, body, chat).respond(request)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await generation(request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        return await generation(request, body, chat=True)

    @app.get("/v1/models")
    async def models() -> Response:
        card = {"id": served_model_name, "object": "model", "created": t_started,
                "owned_by": "splitserve"}
        if conductor.is_ready():
            card["max_model_len"] = conductor.max_model_len
        return MsgspecJSONResponse({"object": "list", "data": [card]})

    @app.get("/health")
    async def health() -> Response:
        h = conductor.health()
        if app.state.draining:  # out of a load balancer's rotation, whatever the workers say
            h["status"] = "draining"
        serving = h.get("status") in ("ok", "degraded")
        return MsgspecJSONResponse(h, status_code=200 if serving else 503)

    @app.post("/admin/role")
    async def set_role(request: Request) -> Response:
        body = await _json_object(request)
        wid, role, reason = body.get("worker_id"), body.get("role"), body.get("reason", "")
        for name, v in (("worker_id", wid), ("role", role), ("reason", reason)):
            if not isinstance(v, str):
                raise ApiError(400, f"`{name}` must be a string", param=name)
        return MsgspecJSONResponse(await conductor.set_role(wid, role, reason or "admin request"))

    @app.get("/admin/roles")
    async def roles() -> Response:
        planner = getattr(app.state, "planner", None)
        return MsgspecJSONResponse({
            "workers": {w["worker_id"]: w["role"] for w in conductor.health()["workers"]
                        if w["alive"]},
            "changes": conductor.role_changes,
            "planner": planner.decisions if planner is not None else None})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _json_object(request: Request) -> dict:
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        raise ApiError(400, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


class ApiKeyMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware, which would stand between a streaming response and the
    client's disconnect)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(("/v1/", "/admin/")):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):
                body = error_body("Missing or incorrect API key: send it as `Authorization: Bearer "
                                  "<key>`.", code="invalid_api_key")
                await MsgspecJSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class DrainingMiddleware:
    """While serve drains (`state.draining`), every /v1/* request gets 503 at once; the requests
    already running are not this middleware's to see (they passed it before). `Connection:
    close` sends the client's next request to another connection, and so another replica."""

    def __init__(self, app, state):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and self.state.draining:
            body = error_body("The server is shutting down and accepts no new requests; retry "
                              "on another replica.", type="service_unavailable_error")
            await MsgspecJSONResponse(body, status_code=503, headers={"Connection": "close"})(
                scope, receive, send)
            return
        await self.app(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A sentence naming the first offending field, and the field as OpenAI's `param`."""
    err = exc.errors()[0]
    loc = [x for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        why = err.get("ctx", {}).get("error", err.get("msg"))
        return f"The request body is not valid JSON ({why}).", None
    param = ""
    for x in loc:
        param += f"[{x}]" if isinstance(x, int) else (f".{x}" if param else str(x))
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if not param:
        if err.get("type") == "missing":
            return "The request body is missing: send a JSON object.", None
        if err.get("type") == "value_error":  # a check across fields: its message says it all
            return msg, None
        return ("The request body must be a JSON object (Content-Type: application/json), got "
                f"something else: {msg}"), None
    if err.get("type") == "missing":
        return f"{param}: this field is required", param
    return f"{param}: {msg}", param


def _install_error_handlers(app: FastAPI) -> None:
    def answer(e: ApiError) -> Response:
        return MsgspecJSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return answer(ApiError(400, message, param=param))

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return answer(exc)

    @app.exception_handler(SplitServeError)
    async def _engine_error(request, exc: SplitServeError):
        e = error_for(exc)
        if e.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, e.status, exc)
        return answer(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        detail = str(exc.detail)
        if detail == "There was an error parsing the body":  # FastAPI's, for what json.loads raised
            detail = ("The request body could not be parsed as JSON: it must be UTF-8, nested "
                      "less than ~1000 levels deep, with no integer of over 4300 digits.")
        return answer(ApiError(exc.status_code, detail, type=kind))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("%s %s: unexpected error", request.method, request.url.path)
        return answer(ApiError(500, "Internal server error.", type="server_error"))
