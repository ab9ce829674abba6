"""The app's network edge: who may ask (a token), how much they may send, and where it listens.

ASGI middlewares that act before FastAPI reads a byte of the body, so an
unauthenticated or oversized request costs nothing, plus the socket binding that
turns "port in use" into one line before any model is loaded.
"""
from __future__ import annotations

import errno
import hmac
import ipaddress
import socket

from simsearch.errors import BadInputError

TOKEN_COOKIE = "simsearch_token"


class UploadCap:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413.

    A declared Content-Length over the limit is refused before anything is read;
    a body streamed without one is counted as it arrives and cut off at the limit.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen, over, started = 0, False, False

        async def counting_receive():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if over:
                return  # the app's own error response is replaced by the 413 below
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _TooLarge:
            pass
        if over and not started:
            await self._refuse(send)

    async def _refuse(self, send):
        body = (f'{{"detail": "upload too large: the limit is {self.limit // (1024 * 1024)} MB; '
                f'send a smaller image"}}').encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class TokenGate:
    """ASGI middleware: every request must carry the token, else 401 JSON.

    Accepted as `Authorization: Bearer TOKEN` (scripts), as `?token=TOKEN` on any URL
    (the page's address: the response then sets an HttpOnly, SameSite=Strict cookie so
    the page's own fetches and <img> loads carry it), or as that cookie. The cookie holds
    an HMAC of the token, not the token. Comparisons take constant time.
    """

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()
        self.cookie = hmac.new(self.token, b"simsearch serve cookie", "sha256").hexdigest().encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        bearer = headers.get(b"authorization", b"")
        if bearer[:7].lower() == b"bearer " and hmac.compare_digest(bearer[7:].strip(), self.token):
            return await self.app(scope, receive, send)
        if hmac.compare_digest(_cookie(headers.get(b"cookie", b""), TOKEN_COOKIE.encode()), self.cookie):
            return await self.app(scope, receive, send)
        given = _query_token(scope.get("query_string", b""))
        if given is not None and hmac.compare_digest(given, self.token):
            cookie = (f"{TOKEN_COOKIE}={self.cookie.decode()}; Path=/; HttpOnly; SameSite=Strict").encode()

            async def send_with_cookie(message):
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
                await send(message)

            return await self.app(scope, receive, send_with_cookie)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = (b'{"detail": "a token is required: open the page as /?token=TOKEN, or send the header '
                b'Authorization: Bearer TOKEN"}')
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def _cookie(header: bytes, name: bytes) -> bytes:
    for part in header.split(b";"):
        key, _, value = part.strip().partition(b"=")
        if key == name:
            return value.strip()
    return b""


def _query_token(query_string: bytes) -> bytes | None:
    from urllib.parse import parse_qs

    values = parse_qs(query_string.decode("latin-1")).get("token")
    return values[-1].encode() if values else None


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def exposure_warning(host: str, token: str | None) -> str | None:
    """What to tell the user who binds beyond loopback (None when `host` is loopback)."""
    if is_loopback(host):
        return None
    if token:
        return (f"warning: {host} is reachable from other machines; requests must carry the token, "
                "but it travels unencrypted (plain HTTP): use this on a trusted network only")
    return (f"warning: {host} is reachable from other machines and the app has no authentication: anyone who "
            "can reach the port can browse the index and its images; pass --token TOKEN "
            "(or set SIMSEARCH_TOKEN) to require one, or bind to 127.0.0.1")


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for uvicorn: a port in use is one clear BadInputError, before any loading."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        # IPv4 first for a name such as localhost, as uvicorn binds it; an IPv6 literal finds only IPv6.
        family, kind, proto, _, address = sorted(found, key=lambda info: info[0] != socket.AF_INET)[0]
    except socket.gaierror as e:
        raise BadInputError(f"cannot listen on {host}: unknown host ({e.strerror}); pass --host") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts reuse the port
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise BadInputError(f"port {port} on {host} is in use; pass --port") from None
        if e.errno == errno.EACCES:
            raise BadInputError(f"port {port} on {host} needs privileges this user lacks; pass --port above 1023") from None
        raise BadInputError(f"cannot listen on {host} port {port} ({e.strerror}); pass --host or --port") from None
    return sock
