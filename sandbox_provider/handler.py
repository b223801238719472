"""HTTP handling: the provider routes of DESIGN.md section 5 and the ``/_sandbox`` controls.

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
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs

from sandbox_provider.charges import InvalidCharge, parse_charge_request
from sandbox_provider.faults import Faults
from sandbox_provider.ledger import IN_PROGRESS, NEW, REPLAY

#: Seconds an idle keep-alive connection (or a stalled TLS handshake) is kept open.
IDLE_TIMEOUT_S = 120
MAX_BODY = 64 * 1024
MAX_KEY = 255
CHARGE_PATH = re.compile(r"/v1/charges/([A-Za-z0-9_]{1,64})")
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


class SandboxHandler(BaseHTTPRequestHandler):
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
        match = CHARGE_PATH.fullmatch(path)
        route = "/v1/charges/{id}" if match else path
        self.server.stats.count_request(f"{self.command} {route}")
        if route not in ("/v1/charges", "/v1/charges/{id}"):
            return self.send_problem(404, "resource_missing", f"no such route: {path}")
        if not self.authorized():
            return
        if route == "/v1/charges" and self.command == "POST":
            return self.create_charge(body)
        if self.command != "GET":
            return self.send_problem(405, "method_not_allowed", f"{self.command} not allowed")
        if match:
            charge = self.server.ledger.get(match.group(1))
            if charge is None:
                return self.send_problem(404, "resource_missing", "no such charge")
            return self.send_json(200, charge)
        self.list_charges(query)

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

    def list_charges(self, query: str):
        key = parse_qs(query).get("idempotency_key", [""])[0]
        if not key:
            return self.send_problem(400, "invalid_request", "idempotency_key is required")
        self.send_json(200, {"data": self.server.ledger.by_key(key)})

    def create_charge(self, body: bytes):
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
            request = parse_charge_request(body)
        except InvalidCharge as exc:
            return self.send_problem(400, "invalid_request", str(exc))
        outcome, reservation = self.server.ledger.begin(key, request.fingerprint)
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
        self.charge_under_faults(key, reservation, request)

    def charge_under_faults(self, key, reservation, request):
        """Make the charge unless the current faults say otherwise."""
        ledger = self.server.ledger
        action = self.server.faults.next_action()
        if action.latency_s:
            time.sleep(action.latency_s)  # the fault itself: a slow provider
        if action.rejects:
            ledger.release(key, reservation)
            if action.kind == "reset":
                return self.reset_connection()
            if action.kind == "hang":
                return self.hang(action.released)
            headers = [] if action.retry_after is None else [("Retry-After", action.retry_after)]
            code = ERROR_CODES.get(action.status, "sandbox_fault")
            return self.send_problem(
                action.status, code, HTTPStatus(action.status).phrase, headers=headers
            )
        charge = ledger.commit(key, reservation, request)
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
            self.send_json(200, {k: v for k, v in charge.items() if k != "status"})

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

    def control(self, path: str, body: bytes):
        server = self.server
        route = (self.command, path)
        if route == ("GET", "/_sandbox/state"):
            return self.send_json(200, self.state())
        if route == ("GET", "/_sandbox/ledger"):
            return self.send_json(200, {"data": server.ledger.charges()})
        if route == ("POST", "/_sandbox/reset"):
            server.reset()
            return self.send_json(200, self.state())
        if route == ("POST", "/_sandbox/faults"):
            try:
                faults = Faults.from_mapping(json.loads(body or b"{}"))
            except ValueError as exc:  # bad JSON or a FaultError
                return self.send_problem(400, "invalid_faults", str(exc))
            server.faults.replace(faults)
            return self.send_json(200, {"faults": server.faults.current()})
        self.send_problem(404, "resource_missing", f"no such control: {self.command} {path}")

    def state(self) -> dict:
        server = self.server
        return {
            **server.stats.snapshot(),
            **server.ledger.summary(),
            "faults": server.faults.current(),
        }

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
