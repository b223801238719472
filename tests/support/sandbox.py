"""Start, steer and stop a real sandbox provider process (``python -m sandbox_provider``).

Tests get the provider the client talks to in production terms: a separate process on a
real socket. Start-up waits for the sandbox's own "listening" line, never a sleep; what
the sandbox does later (settling, delivering events) is awaited by polling its controls
against a deadline.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from settings import SANDBOX_API_KEY

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
CONTROL_TIMEOUT_S = 10.0


class SandboxError(RuntimeError):
    """The sandbox process did not start, or a control call failed."""


class SandboxProcess:
    """One sandbox provider process on a free loopback port.

    ``tls`` serves HTTPS (``ca_bundle`` is then the CA to trust); ``api_key`` is the
    bearer key it expects; ``extra_args`` are more command-line flags, e.g.
    ``("--latency-ms", "20")``. Use as a context manager or call ``start``/``stop``.
    """

    def __init__(self, *, tls: bool = False, api_key: str = SANDBOX_API_KEY, extra_args=()):
        self.tls = tls
        self.api_key = api_key
        self.extra_args = tuple(extra_args)
        self.url: str | None = None
        self.ca_bundle: str | None = None
        self._process: subprocess.Popen | None = None
        self._stderr = None
        self._ssl_context: ssl.SSLContext | None = None

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def start(self, timeout: float = START_TIMEOUT_S) -> SandboxProcess:
        """Spawn the process and return once it accepts connections."""
        args = [sys.executable, "-m", "sandbox_provider", "--host", "127.0.0.1", "--port", "0"]
        args += ["--api-key", self.api_key, *(["--tls"] if self.tls else []), *self.extra_args]
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives until stop()
        self._process = subprocess.Popen(
            args, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL
        )
        try:
            for line in self._read_lines(time.monotonic() + timeout):
                if line.startswith("sandbox ca "):
                    self.ca_bundle = line.removeprefix("sandbox ca ")
                elif line.startswith("sandbox listening on "):
                    self.url = line.removeprefix("sandbox listening on ")
                    break
        except BaseException:
            self.stop()
            raise
        if self.ca_bundle:
            self._ssl_context = ssl.create_default_context(cafile=self.ca_bundle)
        return self

    def _read_lines(self, deadline: float):
        """Yield the process's stdout lines until the deadline; never blocks past it."""
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self._process.stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise SandboxError(f"sandbox did not start in time{self._stderr_tail()}")
                chunk = os.read(self._process.stdout.fileno(), 4096)
                if not chunk:
                    raise SandboxError(f"sandbox exited at start{self._stderr_tail()}")
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    yield line.decode().strip()

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace")[-2000:]
        return f":\n{text}" if text else ""

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait, SIGKILL if it does not go; return the exit code."""
        process, self._process = self._process, None
        if self._stderr is not None:
            self._stderr.close()
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        process.stdout.close()
        return process.returncode

    def state(self) -> dict:
        return self.control("GET", "/_sandbox/state")

    def ledger(self) -> list[dict]:
        """Every charge, as it is now."""
        return self.control("GET", "/_sandbox/ledger")["data"]

    def books(self) -> dict:
        """Charges (``data``) and ``refunds``, read at one instant so they balance."""
        return self.control("GET", "/_sandbox/ledger")

    def refunds(self) -> list[dict]:
        """Every refund, as it is now."""
        return self.books()["refunds"]

    def settle(self, charge_id: str, status: str, **failure) -> dict:
        """Give a charge its final status (``failure_code``/``failure_message`` optional)."""
        path = f"/_sandbox/charges/{charge_id}/settle"
        return self.control("POST", path, {"status": status, **failure})["charge"]

    def settle_refund(self, refund_id: str, status: str, **failure) -> dict:
        """Give a refund its final status (``failure_reason`` optional)."""
        path = f"/_sandbox/refunds/{refund_id}/settle"
        return self.control("POST", path, {"status": status, **failure})["refund"]

    def set_webhooks(self, url: str | None, secret: str | None = None, **settings) -> dict:
        """Send events to ``url`` signed with ``secret`` (``None``: no events);
        ``max_attempts`` and ``backoff_ms`` may be given too."""
        payload = {"url": url, "secret": secret, **settings}
        return self.control("POST", "/_sandbox/webhooks", payload)["webhooks"]

    def events(self) -> list[dict]:
        """Every event made, oldest first: ``{"event", "status", "attempts"}`` each."""
        return self.control("GET", "/_sandbox/events")["data"]

    def redeliver(self, ids=None, *, copies=1, shuffle=False, timestamp=None) -> list[str]:
        """Send stored events (all when ``ids`` is None) again; the ids in sending order."""
        payload = {"copies": copies, "shuffle": shuffle, "timestamp": timestamp}
        if ids is not None:
            payload["ids"] = list(ids)
        return self.control("POST", "/_sandbox/events/redeliver", payload)["sent"]

    def set_faults(self, **faults) -> dict:
        """Replace the faults (absent ones back to healthy); frees hung requests."""
        return self.control("POST", "/_sandbox/faults", faults)["faults"]

    def reset(self) -> dict:
        """Forget charges, refunds, events and counters; clear faults; webhooks as at start."""
        return self.control("POST", "/_sandbox/reset")

    def wait_for_state(self, predicate, timeout: float = 5.0) -> dict:
        """Poll the state until ``predicate(state)`` holds; fail after ``timeout``."""
        return self.wait_for(self.state, predicate, timeout)

    def wait_for_events(self, predicate, timeout: float = 5.0) -> list[dict]:
        """Poll the events until ``predicate(events)`` holds; fail after ``timeout``."""
        return self.wait_for(self.events, predicate, timeout)

    @staticmethod
    def wait_for(read, predicate, timeout: float = 5.0):
        """Call ``read()`` until ``predicate`` holds for its result; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = read()
            if predicate(value):
                return value
            if time.monotonic() > deadline:
                raise SandboxError(f"sandbox never matched: {value}")
            time.sleep(0.01)

    def control(self, method: str, path: str, payload: dict | None = None) -> dict:
        """Call a ``/_sandbox`` control endpoint and return its JSON."""
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(
                request, timeout=CONTROL_TIMEOUT_S, context=self._ssl_context
            ) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            raise SandboxError(f"{method} {path}: {exc.code} {exc.read().decode()}") from exc
