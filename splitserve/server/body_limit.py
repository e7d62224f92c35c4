"""Request bodies over a size limit are refused with 413 before anything parses them.

    Content-Length over the limit      413 at once; not a byte of the body is read
    chunked (no Content-Length)        read and counted here; 413 as soon as the count passes
                                       the limit (at most limit + one chunk is ever held)
    within the limit                   the body, read here, is handed on to the app unchanged

Pure ASGI, like the API-key check: the app sees the request only once its body is known to fit.
"""

from __future__ import annotations

from starlette.datastructures import Headers

from splitserve.server.completions import MsgspecJSONResponse
from splitserve.server.schemas import error_body

# A 128k-token prompt is ~0.5-2 MB of JSON text, and a batch of prompts a few times that.
DEFAULT_MAX_BODY_BYTES = 16 * 2**20


def _too_large(max_bytes: int, size: str) -> dict:
    return error_body(f"The request body is {size}, over this server's limit of {max_bytes} "
                      "bytes. Send a shorter prompt, or fewer prompts per request.",
                      code="request_too_large")


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(f"{int(declared)} bytes", scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client left before its body was complete: nobody to answer
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(f"over {self.max_bytes} bytes (chunked, cut off there)",
                                   scope, receive, send)
                return
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal whole
            if whole is not None:
                msg, whole = whole, None
                return msg
            return await receive()  # then what comes after the body: a disconnect

        await self.app(scope, replay, send)

    async def _refuse(self, size: str, scope, receive, send) -> None:
        # Connection: close, since the rest of the body is never read
        await MsgspecJSONResponse(_too_large(self.max_bytes, size), status_code=413,
                                  headers={"Connection": "close"})(scope, receive, send)
