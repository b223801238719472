"""The listening server: one thread per connection, keep-alive, optional TLS, counters.

Each accepted connection gets its own daemon thread (``ThreadingHTTPServer``), so a
request that hangs or sleeps holds only its own connection, the way a slow provider
does. TLS handshakes happen in that thread too, never in the accept loop, so one slow
or refused handshake cannot stall everyone else.

What a provider does after answering (settling a pending charge or refund, delivering
its event) runs on two scheduler threads of its own, so neither waits for a client.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import sys
import threading
from collections import Counter
from functools import partial
from http.server import ThreadingHTTPServer

from sandbox_provider.events import EventHub
from sandbox_provider.faults import FaultInjector, Faults
from sandbox_provider.handler import IDLE_TIMEOUT_S, SandboxHandler
from sandbox_provider.ledger import Ledger
from sandbox_provider.scheduler import Scheduler

#: Pending charges and refunds waiting to settle: past this many, one settles at once.
MAX_PENDING_SETTLEMENTS = 100_000


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

    ``api_key`` is the bearer secret provider calls must present; ``faults`` the fault
    setting at start; ``webhooks`` the :class:`~sandbox_provider.webhooks.WebhookSettings`
    at start (none: no events); ``ssl_context`` serves HTTPS when given; ``verbose`` logs
    every request to stderr (off by default: a parent that never reads a piped stderr
    would otherwise block the sandbox once the pipe fills).
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(
        self, address, *, api_key, faults=None, webhooks=None, ssl_context=None, verbose=False
    ):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.api_key = api_key
        self.faults = FaultInjector(faults)
        self.stats = Stats()
        self.ssl_context = ssl_context
        self.verbose = verbose
        self.events = EventHub(webhooks)
        self.ledger = Ledger(on_settled=self.events.emit)
        self.settlements = Scheduler("sandbox-settlements", max_tasks=MAX_PENDING_SETTLEMENTS)
        # A port that cannot be bound calls server_close, which stops both threads.
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

    def settle_later(self, obj: dict, delay_s: float) -> None:
        """Settle a pending charge or refund ``delay_s`` from now, as its test token says."""
        ledger = self.ledger
        settle = ledger.settle_charge if obj["object"] == "charge" else ledger.settle_refund
        task = partial(settle, obj["id"])
        if not self.settlements.schedule(delay_s, task):
            task()  # better early than pending for ever

    def reset(self) -> None:
        """Forget every charge, refund, event and count; clear the faults; webhook
        settings back to those given at start."""
        self.faults.replace(Faults())
        self.settlements.clear()
        self.ledger.clear()
        self.events.clear()
        self.stats.clear()

    def server_close(self):
        super().server_close()
        self.settlements.stop()
        self.events.close()
