"""The listening server: one thread per connection, keep-alive, optional TLS, counters.

Each accepted connection gets its own daemon thread (``ThreadingHTTPServer``), so a
request that hangs or sleeps holds only its own connection, the way a slow provider
does. TLS handshakes happen in that thread too, never in the accept loop, so one slow
or refused handshake cannot stall everyone else.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import sys
import threading
from collections import Counter
from http.server import ThreadingHTTPServer

from sandbox_provider.faults import FaultInjector, Faults
from sandbox_provider.handler import IDLE_TIMEOUT_S, SandboxHandler
from sandbox_provider.ledger import Ledger


class Stats:
    """Traffic counters for the control endpoint.

    ``connections_accepted`` counts connections when their first provider request
    arrives, so control calls (reading this state included) never move it and a test
    can assert that a keep-alive client used exactly one. ``hung`` is a gauge of
    requests held by a hang fault; reset keeps it, since it frees them itself.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._connections = 0
        self._requests: Counter[str] = Counter()
        self._hung = 0

    def count_connection(self) -> None:
        with self._lock:
            self._connections += 1

    def count_request(self, route: str) -> None:
        with self._lock:
            self._requests[route] += 1

    def hang_started(self) -> None:
        with self._lock:
            self._hung += 1

    def hang_ended(self) -> None:
        with self._lock:
            self._hung -= 1

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "connections_accepted": self._connections,
                "requests": dict(self._requests),
                "hung": self._hung,
            }

    def clear(self) -> None:
        with self._lock:
            self._connections = 0
            self._requests.clear()


class SandboxServer(ThreadingHTTPServer):
    """The sandbox provider bound to ``address``.

    ``api_key`` is the bearer secret charge calls must present; ``faults`` the fault
    setting at start; ``ssl_context`` serves HTTPS when given; ``verbose`` logs every
    request to stderr (off by default: a parent that never reads a piped stderr would
    otherwise block the sandbox once the pipe fills).
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address, *, api_key, faults=None, ssl_context=None, verbose=False):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.api_key = api_key
        self.ledger = Ledger()
        self.faults = FaultInjector(faults)
        self.stats = Stats()
        self.ssl_context = ssl_context
        self.verbose = verbose
        super().__init__(address, SandboxHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.ssl_context else 'http'}://{host}:{port}"

    def server_bind(self):
        # HTTPServer.server_bind does a reverse DNS lookup of the host: skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def finish_request(self, request, client_address):
        if self.ssl_context is None:
            return super().finish_request(request, client_address)
        request.settimeout(IDLE_TIMEOUT_S)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except OSError:
            return  # the client refused our certificate or went away mid-handshake
        try:
            super().finish_request(tls, client_address)
        finally:
            self.shutdown_request(tls)

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError | ssl.SSLError):
            return  # clients hanging up on us is what the sandbox is for
        super().handle_error(request, client_address)

    def reset(self) -> None:
        """Forget every charge and count, and clear the faults."""
        self.faults.replace(Faults())
        self.ledger.clear()
        self.stats.clear()
