"""Who may use the standalone page: the user who started it, not any web page or any machine on the network.

Whatever reaches the port could otherwise start trainings (hours of GPU), write files and probe folders.
The guard wraps the whole ASGI app (the Gradio page, its queue and websockets, and our REST routes):

- a random token made at start and printed with the page's URL (``/?token=...``, as Jupyter does); the
  first visit with it sets an HttpOnly, SameSite=Strict cookie that the page's later requests carry; scripts
  send ``Authorization: Bearer <token>``;
- or, with ``--auth user:pass``, HTTP basic credentials (as the WebUIs' ``--api-auth``);
- a request from another site's page (its ``Origin`` is not this server) is refused even with the cookie.

Pure ASGI (no ``BaseHTTPMiddleware``) so Gradio's streamed responses and websockets pass untouched.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable, Mapping
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs

from ..api import cross_site_reason

COOKIE = "lora_trainer_token"
# Gradio 3.41 calls these on its own server without any credentials (starting its queue at launch,
# resetting a generator); both are harmless: the first starts the queue once, the second needs a
# random session id.
GRADIO_INTERNAL = frozenset({"/startup-events", "/reset"})
ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


def new_token() -> str:
    return secrets.token_urlsafe(24)


def is_loopback(host: str) -> bool:
    """``localhost`` and loopback addresses: only processes of this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _headers(scope: Mapping[str, Any]) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class Guard:
    """ASGI middleware: lets through requests carrying the token (query, cookie or bearer header) or
    basic credentials from ``credentials``, and only from this server's own pages or from non-browsers.

    ``internal`` holds bearer tokens the server's own parts send to it (Gradio 3.41's queue posts each
    event to ``/api/predict`` with its own token); it is filled once the app exists."""

    def __init__(
        self, app: ASGIApp, token: str, credentials: Mapping[str, str] | None = None, internal: set[str] | None = None
    ):
        self.app = app
        self.token = token
        self.credentials = dict(credentials or {})
        self.internal = internal if internal is not None else set()

    def _query_token(self, scope: Mapping[str, Any]) -> str | None:
        values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
        return values[0] if values else None

    def _authorized(self, scope: Mapping[str, Any], headers: Mapping[str, str]) -> bool:
        if _same(self._query_token(scope), self.token):
            return True
        cookie = SimpleCookie(headers.get("cookie", ""))
        if COOKIE in cookie and _same(cookie[COOKIE].value, self.token):
            return True
        kind, _, value = headers.get("authorization", "").partition(" ")
        if kind.lower() == "bearer":
            return any(_same(value.strip(), t) for t in (self.token, *self.internal))
        if kind.lower() == "basic" and self.credentials:
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except ValueError:
                return False
            return user in self.credentials and _same(password, self.credentials[user])
        return False

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        reason = cross_site_reason(headers)
        if reason is None and scope.get("path") in GRADIO_INTERNAL:
            await self.app(scope, receive, send)
            return
        if reason is None and not self._authorized(scope, headers):
            reason = "unauthorized"
        if reason is not None:
            await self._refuse(scope, send, reason)
            return
        if _same(self._query_token(scope), self.token) and scope["type"] == "http":
            send = self._setting_cookie(send)
        await self.app(scope, receive, send)

    def _setting_cookie(self, send: Callable) -> Callable:
        cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict".encode()

        async def wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        return wrapped

    async def _refuse(self, scope: Mapping[str, Any], send: Callable, reason: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if reason == "unauthorized":
            status = 401
            text = (
                "this page needs the link printed when `lora_trainer ui` started (it ends in ?token=...), "
                "or `Authorization: Bearer <token>`"
            )
            if self.credentials:
                text += ", or the user and password given with --auth"
        else:
            status, text = 403, reason
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        if status == 401 and self.credentials:
            headers.append((b"www-authenticate", b'Basic realm="lora_trainer"'))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": text.encode()})


def launch_guarded(blocks: Any, host: str, port: int, token: str, credentials: Mapping[str, str] | None = None) -> Any:
    """Launch a Gradio ``Blocks`` (queued) behind a :class:`Guard`; returns its FastAPI app, to which
    REST routes can still be added (they are behind the guard too)."""
    from starlette.middleware import Middleware

    internal: set[str] = set()
    middleware = [Middleware(Guard, token=token, credentials=credentials, internal=internal)]
    blocks.queue().launch(
        server_name=host, server_port=port, inbrowser=False, prevent_thread_lock=True, app_kwargs={"middleware": middleware}
    )
    # the app that serves: Gradio 3.41's blocks.app is another App object, made by queue(), that nothing serves
    app = getattr(blocks, "server_app", None) or blocks.app
    queue_token = getattr(app, "queue_token", None)  # Gradio 3.41 (4.x calls no routes itself)
    if queue_token:
        internal.add(queue_token)
    return app
