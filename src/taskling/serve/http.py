"""HTTP plumbing of the server: the one error shape, and the ASGI middleware around the app.

Every error the server answers, whoever raises it (a route, request validation, the body
limit, the API key check, an unknown path, a crash), has the same JSON body, modelled on
OpenAI's:

    {"error": {"message": "...", "type": "invalid_request_error", "code": 422, "param": null}}

`code` is the HTTP status, `type` a stable word for it (`ERROR_TYPES`), `param` the request
field at fault where one is known. `StatusCounter`, the outermost middleware, counts every
answered status in `/metrics` (401 and 413 included) and turns an unhandled exception into
that shape with status 500.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    503: "overloaded_error",
}
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The one documented error body."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": status, "param": param}}


async def send_error(
    send: Send, status: int, message: str, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(error_body(status, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += extra_headers or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class StatusCounter:
    """ASGI middleware: count every response by endpoint and status; a crash answers a shaped 500."""

    def __init__(self, app: Any, count: Callable[[str, int], None], endpoints: Collection[str]) -> None:
        self.app = app
        self.count = count
        self.endpoints = set(endpoints)
        # `/v1/models/{model}`: any one path segment after the prefix counts as that endpoint.
        self.templates = {e[: e.index("{")]: e for e in endpoints if e.endswith("}") and "{" in e}

    def endpoint(self, path: str) -> str:
        if path in self.endpoints:
            return path
        for prefix, template in self.templates.items():
            rest = path[len(prefix) :]
            if path.startswith(prefix) and rest and "/" not in rest:
                return template
        return "other"

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Unknown paths share one label, so a scanner cannot grow the metrics without bound.
        endpoint = self.endpoint(scope["path"])
        started = False

        async def counting_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.count(endpoint, int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if started:
                raise
            log.exception("request to %s failed", endpoint)
            await send_error(counting_send, 500, "internal error; the request was not answered")


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes answers 413 before any parsing."""

    def __init__(self, app: Any, limit: int, on_reject: Callable[[], None]) -> None:
        self.app = app
        self.limit = limit
        self.on_reject = on_reject

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self.refuse(send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self.refuse(send)
                return
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def refuse(self, send: Send) -> None:
        self.on_reject()
        await send_error(send, 413, f"request body over {self.limit} bytes")


class ApiKey:
    """ASGI middleware: every path but /healthz needs `Authorization: Bearer KEY` or `X-API-Key: KEY`."""

    def __init__(self, app: Any, key: bytes, on_reject: Callable[[], None]) -> None:
        self.app = app
        self.key = key
        self.on_reject = on_reject

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        if not hmac.compare_digest(given, self.key):  # constant time
            self.on_reject()
            await send_error(send, 401, "missing or wrong API key", [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)
