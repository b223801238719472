"""Start, use and stop a real localstripe process: a stateful fake of Stripe's API.

``localstripe --port N`` binds its own dual-stack socket, so a free port is chosen here
first. aiohttp prints ``======== Running on http://[::]:N ========`` once it listens:
start-up waits for that line (unbuffered output) against a deadline, never a sleep.

What localstripe does not implement, the unit tests cover with ``responses``: idempotency
(it ignores ``Idempotency-Key``: no replays, no ``idempotency_error``, no 409), 429 and
5xx answers, ``Stripe-Should-Retry``, listing PaymentIntents by ``created``, Search,
refund ``reason`` and the over-refund 400, and ``error.payment_intent`` on a card error.
It also refuses ``description`` on a PaymentIntent. It keeps its store in
``/tmp/localstripe.pickle`` (``--from-scratch`` only skips reading it at start).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 10.0
READY_MARK = "Running on "
TEST_KEY = "sk_test_localstripe_0123456789"
#: Stripe's test cards, as localstripe knows them.
CARD_OK = "4242424242424242"
CARD_DECLINED_ON_CHARGE = "4000000000000341"  # attaches fine, declined when charged
CARD_NEEDS_AUTHENTICATION = "4000002500003155"  # 3-D Secure required


class LocalStripeError(RuntimeError):
    """localstripe did not start, or answered a helper call with an error."""


class LocalStripeProcess:
    """One localstripe process on a free loopback port.

    ``api_key`` is the secret key clients send (localstripe takes any ``sk_...``). Use as
    a context manager or call ``start``/``stop``.
    """

    def __init__(self, api_key: str = TEST_KEY):
        self.api_key = api_key
        self.url: str | None = None
        self._process: subprocess.Popen | None = None
        self._stderr = None
        self._drain: threading.Thread | None = None

    def __enter__(self) -> LocalStripeProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self, timeout: float = START_TIMEOUT_S) -> LocalStripeProcess:
        """Spawn the process and return once it listens."""
        port = _free_port()
        executable = Path(sys.executable).with_name("localstripe")
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives until stop()
        self._process = subprocess.Popen(
            [str(executable), "--port", str(port), "--from-scratch"],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        try:
            self._wait_ready(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise
        # Keep reading its output so a full pipe can never block it.
        self._drain = threading.Thread(target=self._process.stdout.read, daemon=True)
        self._drain.start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    def _wait_ready(self, deadline: float) -> None:
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self._process.stdout, selectors.EVENT_READ)
            while READY_MARK.encode() not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise LocalStripeError(f"localstripe did not start in time{self._tail()}")
                chunk = os.read(self._process.stdout.fileno(), 4096)
                if not chunk:
                    raise LocalStripeError(f"localstripe exited at start{self._tail()}")
                buffer += chunk

    def _tail(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace")[-2000:]
        return f":\n{text}" if text else ""

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait, SIGKILL if it does not go; return the exit code."""
        process, self._process = self._process, None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        if self._drain is not None:
            self._drain.join(timeout)  # at end of file now
            self._drain = None
        process.stdout.close()
        return process.returncode

    # -- Stripe's API, for arranging and checking what a test does ---------------------

    def call(self, method: str, path: str, data: dict | None = None) -> dict:
        """One API call, form-encoded like Stripe's; the decoded JSON answer."""
        body = urllib.parse.urlencode(data or {}).encode() if method == "POST" else None
        request = urllib.request.Request(
            self.url + path,
            data=body,
            method=method,
            headers={"Authorization": f"Bearer {self.api_key}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise LocalStripeError(
                f"{method} {path}: HTTP {exc.code} {exc.read()[:300]!r}"
            ) from None

    def payment_method(self, number: str = CARD_OK) -> str:
        """A new card PaymentMethod's id (``pm_...``)."""
        card = {"number": number, "exp_month": "12", "exp_year": "2030", "cvc": "123"}
        data = {"type": "card", **{f"card[{k}]": v for k, v in card.items()}}
        return self.call("POST", "/v1/payment_methods", data)["id"]

    def customer_with(self, payment_method: str) -> str:
        """A new Customer, with ``payment_method`` attached to it; its id."""
        customer = self.call("POST", "/v1/customers", {"email": "jenny@example.com"})["id"]
        self.call("POST", f"/v1/payment_methods/{payment_method}/attach", {"customer": customer})
        return customer

    def payment_intents(self, idempotency_key: str | None = None) -> list[dict]:
        """Every PaymentIntent (all pages), or those with our ``metadata[idempotency_key]``."""
        return self._all("/v1/payment_intents", idempotency_key)

    def refunds(self, idempotency_key: str | None = None) -> list[dict]:
        return self._all("/v1/refunds", idempotency_key)

    def _all(self, path: str, idempotency_key: str | None) -> list[dict]:
        found: list[dict] = []
        query = {"limit": "100"}
        while True:
            page = self.call("GET", f"{path}?{urllib.parse.urlencode(query)}")
            found += page["data"]
            if not page["has_more"] or not page["data"]:
                break
            query["starting_after"] = page["data"][-1]["id"]
        if idempotency_key is None:
            return found
        return [o for o in found if o.get("metadata", {}).get("idempotency_key") == idempotency_key]

    def send_webhooks(self, name: str, url: str, secret: str) -> None:
        """Have localstripe post its events, signed with ``secret``, to ``url``."""
        data = {"url": url, "secret": secret}
        request = urllib.request.Request(
            f"{self.url}/_config/webhooks/{name}",
            data=urllib.parse.urlencode(data).encode(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S):
            pass


def _free_port() -> int:
    """A port nothing listens on now (localstripe binds ``::`` itself)."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::", 0))
        return s.getsockname()[1]
