"""HTTP handling: the provider routes of DESIGN.md section 5a (charges and refunds).

The ``/_sandbox`` controls are in :mod:`sandbox_provider.controls`.

One handler instance serves one connection for its whole keep-alive life, which is how
the connection counter knows a connection once, however many requests it carries.
Every answer is JSON with a Content-Length (keep-alive needs it), except the faults
whose point is to answer something else.
"""

from __future__ import annotations

import hmac
import io
import json
import os
import re
import socket
import struct
import time
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs

from sandbox_provider.charges import InvalidRequest, parse_charge_request
from sandbox_provider.controls import SandboxControls
from sandbox_provider.faults import DEFAULT_SETTLE_LATER_MS
from sandbox_provider.ledger import IN_PROGRESS, NEW, REPLAY, Ledger
from sandbox_provider.refunds import RefundRefused, parse_refund_request

#: Seconds an idle keep-alive connection (or a stalled TLS handshake) is kept open.
IDLE_TIMEOUT_S = 120
MAX_BODY = 64 * 1024
MAX_KEY = 255
OBJECT_PATH = re.compile(r"/v1/(charges|refunds)(?:/([A-Za-z0-9_]{1,64}))?")
#: Resource -> how to read its create request and the ledger method that records it.
CREATORS = {
    "charges": (parse_charge_request, Ledger.commit_charge),
    "refunds": (parse_refund_request, Ledger.commit_refund),
}
ERROR_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "resource_missing",
    409: "request_in_progress",
    429: "rate_limited",
    500: "api_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}
PARTIAL_RESPONSE = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Len"
HTML_PAGE = b"<html><body><h1>502 Bad Gateway</h1><p>upstream error</p></body></html>"


class SandboxHandler(SandboxControls, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "PaymentSandbox/1.0"
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT_S

    def setup(self):
        super().setup()
        self.carried_provider_traffic = False

    def do_GET(self):
        self.dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def dispatch(self):
        path, _, query = self.path.partition("?")
        body = self.read_body()
        if body is None:
            return
        if path.startswith("/_sandbox/"):
            return self.control(path, body)
        if not self.carried_provider_traffic:
            self.carried_provider_traffic = True
            self.server.stats.count_connection()
        match = OBJECT_PATH.fullmatch(path)
        route = f"/v1/{match[1]}{'/{id}' if match[2] else ''}" if match else path
        self.server.stats.count_request(f"{self.command} {route}")
        if match is None:
            return self.send_problem(404, "resource_missing", f"no such route: {path}")
        if not self.authorized():
            return
        resource, object_id = match.groups()
        if object_id is None and self.command == "POST":
            return self.create(body, *CREATORS[resource])
        if self.command != "GET":
            return self.send_problem(405, "method_not_allowed", f"{self.command} not allowed")
        if object_id is None:
            return self.list_by_key(resource, query)
        found = self.ledger_get(resource, object_id)
        if found is None:
            return self.send_problem(404, "resource_missing", f"no such {resource[:-1]}")
        self.send_json(200, found)

    def read_body(self) -> bytes | None:
        """The request body, or ``None`` after answering a request whose body is unusable."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.send_problem(411, "length_required", "send a Content-Length", close=True)
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.send_problem(400, "invalid_request", "bad Content-Length", close=True)
            return None
        if length > MAX_BODY:
            self.send_problem(413, "body_too_large", f"over {MAX_BODY} bytes", close=True)
            return None
        return self.rfile.read(length)

    def authorized(self) -> bool:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        expected = self.server.api_key.encode()
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected):
            return True
        self.send_problem(
            401,
            "invalid_api_key",
            "missing or invalid API key",
            headers=[("WWW-Authenticate", 'Bearer realm="sandbox"')],
        )
        return False

    def ledger_get(self, resource: str, object_id: str) -> dict | None:
        ledger = self.server.ledger
        return ledger.get(object_id) if resource == "charges" else ledger.refund(object_id)

    def list_by_key(self, resource: str, query: str):
        key = parse_qs(query).get("idempotency_key", [""])[0]
        if not key:
            return self.send_problem(400, "invalid_request", "idempotency_key is required")
        ledger = self.server.ledger
        found = ledger.by_key(key) if resource == "charges" else ledger.refunds_by_key(key)
        self.send_json(200, {"data": found})

    def create(self, body: bytes, parse, commit):
        """Create a charge or a refund: one set of idempotency rules and faults for both."""
        if self.headers.get_content_type() != "application/json":
            return self.send_problem(415, "unsupported_media_type", "send application/json")
        key = self.headers.get("Idempotency-Key", "").strip()
        if not key:
            return self.send_problem(
                400, "idempotency_key_required", "an Idempotency-Key header is required"
            )
        if len(key) > MAX_KEY:
            return self.send_problem(400, "invalid_request", f"Idempotency-Key over {MAX_KEY}")
        try:
            request = parse(body)
        except InvalidRequest as exc:
            return self.send_problem(400, "invalid_request", str(exc))
        ledger = self.server.ledger
        outcome, reservation = ledger.begin(key, request.fingerprint)
        if outcome == REPLAY:
            status, payload = reservation.reply
            return self.send_json(status, payload, [("Idempotent-Replayed", "true")])
        if outcome == IN_PROGRESS:
            return self.send_problem(
                409,
                "request_in_progress",
                "a request with this Idempotency-Key is still being processed",
                headers=[("Retry-After", "1")],
            )
        if outcome != NEW:
            return self.send_problem(
                422,
                "idempotency_key_reused",
                "this Idempotency-Key was used with a different request body",
            )
        record = partial(commit, ledger, key, reservation, request)
        self.create_under_faults(key, reservation, record)

    def create_under_faults(self, key, reservation, record):
        """Call ``record(settle_later)`` unless the faults say otherwise; answer as they say."""
        server = self.server
        action = server.faults.next_action()
        if action.latency_s:
            time.sleep(action.latency_s)  # the fault itself: a slow provider
        if action.rejects:
            server.ledger.release(key, reservation)
            if action.kind == "reset":
                return self.reset_connection()
            if action.kind == "hang":
                return self.hang(action.released)
            headers = [] if action.retry_after is None else [("Retry-After", action.retry_after)]
            code = ERROR_CODES.get(action.status, "sandbox_fault")
            return self.send_problem(
                action.status, code, HTTPStatus(action.status).phrase, headers=headers
            )
        try:
            created = record(settle_later=action.settle_s > 0)
        except RefundRefused as exc:
            server.ledger.release(key, reservation)  # nothing moved: the key may be retried
            return self.send_problem(exc.status, exc.code, str(exc))
        if created["status"] == "pending":
            server.settle_later(created, action.settle_s or DEFAULT_SETTLE_LATER_MS / 1000)
        status, payload = reservation.reply
        if action.kind == "ok" and action.trickle_s:
            self.trickle(action.trickle_s, action.released, status, payload)
        elif action.kind == "ok":
            self.send_json(status, payload)
        elif action.kind == "hang_after_commit":
            self.hang(action.released)
        elif action.kind == "reset_mid_response":
            self.wfile.write(PARTIAL_RESPONSE)
            self.reset_connection()
        elif action.kind == "malformed_json":
            self.send_raw(200, "application/json", b'{"id": ')
        elif action.kind == "html":
            self.send_raw(200, "text/html; charset=utf-8", HTML_PAGE)
        else:
            self.send_json(200, {k: v for k, v in created.items() if k != "status"})

    def hang(self, released):
        """Answer nothing until the fault is cleared, then drop the connection."""
        stats = self.server.stats
        stats.hang_started()
        try:
            released.wait()
        finally:
            stats.hang_ended()
        self.close_connection = True

    def trickle(self, delay_s, released, status, payload):
        """Send the answer one byte every ``delay_s``; the rest at once when released."""
        wfile, self.wfile = self.wfile, io.BytesIO()
        try:
            self.send_json(status, payload)
        finally:
            answer, self.wfile = self.wfile.getvalue(), wfile
        self.wfile.write(answer[:1])
        for offset in range(1, len(answer)):
            if released.wait(delay_s):
                self.wfile.write(answer[offset:])
                return
            self.wfile.write(answer[offset : offset + 1])

    def reset_connection(self):
        """Close with a TCP RST (SO_LINGER 0), not the orderly FIN of a normal close."""
        sock = self.connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        os.close(sock.detach())
        self.close_connection = True

    def send_json(self, status, payload, headers=()):
        self.send_raw(status, "application/json", json.dumps(payload).encode(), headers)

    def send_problem(self, status, code, message, headers=(), close=False):
        if close:
            headers = [*headers, ("Connection", "close")]
        self.send_json(status, {"error": {"code": code, "message": message}}, headers)

    def send_raw(self, status, content_type, body: bytes, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, str(value))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        """Answer protocol errors (bad request line, unknown method) in JSON, not HTML."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        code = int(code)
        reason = message or HTTPStatus(code).phrase
        self.send_problem(code, ERROR_CODES.get(code, "invalid_request"), reason, close=True)

    def log_message(self, format, *args):
        if self.server.verbose:
            super().log_message(format, *args)
