"""A fault-injecting HTTP proxy on loopback, in front of a real provider (localstripe).

Every request is forwarded to ``upstream`` as it came (method, path, query, headers,
body) and its answer sent back, except requests on the proxy's *route* (by default
``POST /v1/payment_intents``: the request that moves money), which meet the faults the
test set: a script consumed one request at a time, then a fault for the rest.

Faults that never forward (the provider never sees the request): :data:`HANG`,
:data:`RESET`, :func:`answer` (a Stripe-shaped error of any status, with or without
``Retry-After`` and ``Stripe-Should-Retry``). Faults that forward first, so the provider
acts (a PaymentIntent exists) and only the answer is lost or spoilt:
:data:`HANG_AFTER`, :data:`RESET_AFTER` (part of the answer, then a TCP RST),
:data:`DROP_AFTER` (closed without a byte), :func:`trickle`, :func:`rewrite` (and the
ready-made :data:`MALFORMED_JSON`, :data:`HTML`, :data:`WITHOUT_STATUS`,
:func:`with_status`). :func:`latency` waits, then forwards.

Hung and trickling requests end when the test changes the faults, resets or stops the
proxy (and after :data:`HANG_LIMIT_S` at the latest): nothing is waited for with a sleep
except the injected latency and trickle themselves.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: The request the faults apply to unless told otherwise: the one that moves money.
PAYMENT_INTENTS = ("POST", "/v1/payment_intents")
#: The longest a hung or trickling request is held before its connection is closed.
HANG_LIMIT_S = 60.0
UPSTREAM_TIMEOUT_S = 30.0
#: Headers that describe one hop, never forwarded either way.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
        "host",
        "server",
        "date",
    }
)

#: A rewrite: (status, content type, body) of the provider's answer -> the one sent.
Rewrite = Callable[[int, str, bytes], tuple[int, str, bytes]]


@dataclass(frozen=True)
class Fault:
    """What to do with one request on the route.

    ``kind``: ``pass``, ``latency`` (``seconds``, then forward), ``hang``, ``reset``,
    ``answer`` (``status`` with ``body`` and ``headers``, not forwarded),
    ``hang_after``, ``reset_after``, ``drop_after``, ``trickle`` (a byte every
    ``seconds``) or ``rewrite`` (``transform``) after forwarding.
    """

    kind: str
    seconds: float = 0.0
    status: int = 0
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    transform: Rewrite | None = None

    @property
    def forwards(self) -> bool:
        return self.kind not in ("hang", "reset", "answer")


PASS = Fault("pass")
HANG = Fault("hang")
RESET = Fault("reset")
HANG_AFTER = Fault("hang_after")
RESET_AFTER = Fault("reset_after")
DROP_AFTER = Fault("drop_after")


def latency(seconds: float) -> Fault:
    return Fault("latency", seconds=seconds)


def trickle(seconds: float) -> Fault:
    """Forward, then send the whole answer (status line included) a byte every ``seconds``."""
    return Fault("trickle", seconds=seconds)


def rewrite(transform: Rewrite) -> Fault:
    return Fault("rewrite", transform=transform)


#: Stripe's error bodies (docs.stripe.com/api/errors), by status.
STRIPE_ERRORS = {
    400: {
        "type": "invalid_request_error",
        "code": "parameter_invalid_empty",
        "param": "payment_method",
        "message": "You passed an empty string for 'payment_method'. We assume empty values "
        "are an attempt to unset a parameter; however 'payment_method' cannot be unset.",
    },
    409: {
        "type": "invalid_request_error",
        "code": "idempotency_key_in_use",
        "message": "There is currently another in-progress request using this Idempotent Key "
        "(that probably means you submitted twice, and the other request is still going "
        "through). Please try again later.",
    },
    429: {
        "type": "invalid_request_error",
        "code": "rate_limit",
        "message": "Request rate limit exceeded. Learn more about rate limits here "
        "https://stripe.com/docs/rate-limits.",
    },
}
API_ERROR = {"type": "api_error", "message": "An unknown error occurred"}


def answer(
    status: int,
    *,
    retry_after: int | None = None,
    should_retry: bool | None = None,
    error: dict | None = None,
) -> Fault:
    """Answer ``status`` with a Stripe-shaped error body without forwarding the request."""
    body = {"error": error or STRIPE_ERRORS.get(status, API_ERROR)}
    headers = [("Content-Type", "application/json"), ("Request-Id", "req_faultproxy")]
    if retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    if should_retry is not None:
        headers.append(("Stripe-Should-Retry", "true" if should_retry else "false"))
    return Fault("answer", status=status, body=json.dumps(body).encode(), headers=tuple(headers))


def _malformed(status: int, content_type: str, body: bytes) -> tuple[int, str, bytes]:
    return status, content_type, body[: max(1, len(body) // 3)]


def _html(status: int, content_type: str, body: bytes) -> tuple[int, str, bytes]:
    page = b"<!DOCTYPE html><html><body><h1>Service temporarily degraded</h1></body></html>"
    return status, "text/html; charset=utf-8", page


def _edit(change: Callable[[dict], None]) -> Rewrite:
    def transform(status: int, content_type: str, body: bytes) -> tuple[int, str, bytes]:
        obj = json.loads(body)
        change(obj)
        return status, content_type, json.dumps(obj).encode()

    return transform


MALFORMED_JSON = rewrite(_malformed)
HTML = rewrite(_html)
WITHOUT_STATUS = rewrite(_edit(lambda obj: obj.pop("status", None)))


def with_status(status: str) -> Fault:
    """Forward, and answer the provider's object with its ``status`` replaced."""
    return rewrite(_edit(lambda obj: obj.__setitem__("status", status)))


class FaultProxy:
    """One proxy on a free loopback port; a context manager, or ``start``/``stop``.

    :param upstream: the provider's base URL (``http://host:port``).
    :param route: ``(method, path)`` of the requests faults apply to.
    """

    def __init__(self, upstream: str, route: tuple[str, str] = PAYMENT_INTENTS):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.route = route
        self.url: str | None = None
        self._lock = threading.Lock()
        self._script: list[Fault] = []
        self._then = PASS
        self._released = threading.Event()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._log: list[tuple[str, str, str]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> FaultProxy:
        handler = type("Handler", (_Handler,), {"proxy": self})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        return self

    def stop(self) -> None:
        self._released.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    # -- what the test controls ---------------------------------------------------------

    def set_faults(self, *script: Fault, then: Fault = PASS) -> None:
        """``script`` for the next requests on the route, one each, then ``then`` for every
        later one. Frees the requests earlier faults left hanging or trickling."""
        with self._lock:
            self._released.set()
            self._released = threading.Event()
            self._script = list(script)
            self._then = then

    def reset(self) -> None:
        """No faults, nothing hanging, counters at zero."""
        self.set_faults()
        with self._lock:
            self._counts.clear()
            self._log.clear()

    def count(self, method: str | None = None, path: str | None = None) -> int:
        """Requests received for ``method path`` (default: the route), faulted or not."""
        method, path = method or self.route[0], path or self.route[1]
        with self._lock:
            return self._counts[(method, path)]

    def log(self) -> list[tuple[str, str, str]]:
        """``(method, path, fault kind)`` of every request received, in order."""
        with self._lock:
            return list(self._log)

    def _next(self, method: str, path: str) -> tuple[Fault, threading.Event]:
        with self._lock:
            self._counts[(method, path)] += 1
            fault = PASS
            if (method, path) == self.route:
                fault = self._script.pop(0) if self._script else self._then
            self._log.append((method, path, fault.kind))
            return fault, self._released


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: FaultProxy

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def log_message(self, format, *args) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = urllib.parse.urlsplit(self.path).path
        fault, released = self.proxy._next(self.command, path)
        if fault.kind == "hang":
            return self._hang(released)
        if fault.kind == "reset":
            return self._reset()
        if fault.kind == "answer":
            return self._send(fault.status, list(fault.headers), fault.body)
        if fault.kind == "latency":
            released.wait(fault.seconds)  # the fault itself: a slow provider
        status, headers, reply = self._forward(body)
        if fault.kind == "hang_after":
            return self._hang(released)
        if fault.kind == "reset_after":
            self.wfile.write(f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode())
            return self._reset()
        if fault.kind == "drop_after":
            self.close_connection = True
            return None
        if fault.kind == "rewrite":
            assert fault.transform is not None
            content_type = next((v for k, v in headers if k.lower() == "content-type"), "")
            status, content_type, reply = fault.transform(status, content_type, reply)
            headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
            headers.append(("Content-Type", content_type))
        if fault.kind == "trickle":
            return self._trickle(fault.seconds, released, status, headers, reply)
        return self._send(status, headers, reply)

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        host, port = self.proxy.upstream
        connection = http.client.HTTPConnection(host, port, timeout=UPSTREAM_TIMEOUT_S)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Host"] = f"{host}:{port}"
            if body or self.command == "POST":
                headers["Content-Length"] = str(len(body))
            connection.request(self.command, self.path, body=body or None, headers=headers)
            response = connection.getresponse()
            reply = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
            return response.status, kept, reply
        finally:
            connection.close()

    def _head(self, status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
        lines += [f"{name}: {value}" for name, value in headers]
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.wfile.write(self._head(status, headers, body) + body)

    def _hang(self, released: threading.Event) -> None:
        """Answer nothing until the faults change, then close the connection."""
        released.wait(HANG_LIMIT_S)
        self.close_connection = True

    def _trickle(
        self,
        seconds: float,
        released: threading.Event,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> None:
        """The whole answer a byte every ``seconds``; the rest at once when released."""
        data = self._head(status, headers, body) + body
        try:
            for offset in range(len(data)):
                if released.wait(seconds):
                    self.wfile.write(data[offset:])
                    return
                self.wfile.write(data[offset : offset + 1])
        except OSError:  # the client gave up and closed: so does the answer
            self.close_connection = True

    def _reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), not the orderly FIN of a normal close."""
        sock = self.connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        os.close(sock.detach())
        self.close_connection = True
