"""The ``/_sandbox`` controls: how tests steer the sandbox and read what it did.

No API key: they serve the test that started the sandbox, never a client.

- ``GET state``, ``GET ledger`` (``{"data": [charges], "refunds": [refunds]}``),
  ``POST reset``, ``POST faults`` (see :mod:`sandbox_provider.faults`).
- ``GET``/``POST webhooks``: where events go (see :mod:`sandbox_provider.webhooks`).
- ``GET events``; ``POST events/redeliver`` sends stored events again.
- ``POST charges/<id>/settle`` and ``POST refunds/<id>/settle`` with
  ``{"status": "succeeded"|"failed"}`` give the object that final status, as a
  provider's late verdict would, and emit its event.
"""

from __future__ import annotations

import json
import re

from sandbox_provider.events import Redelivery
from sandbox_provider.faults import Faults
from sandbox_provider.refunds import RefundRefused
from sandbox_provider.webhooks import WebhookSettings

SETTLE_PATH = re.compile(r"/_sandbox/(charges|refunds)/([A-Za-z0-9_]{1,64})/settle")
#: Optional fields of a settle control, by resource.
SETTLE_FIELDS = {
    "charges": ("failure_code", "failure_message"),
    "refunds": ("failure_reason",),
}


class InvalidControl(ValueError):
    """A control body the sandbox cannot apply."""


class SandboxControls:
    """The control routes, mixed into the request handler (they answer with its methods)."""

    def control(self, path: str, body: bytes):
        server = self.server
        route = (self.command, path)
        if route == ("GET", "/_sandbox/state"):
            return self.send_json(200, self.state())
        if route == ("GET", "/_sandbox/ledger"):
            return self.send_json(200, server.ledger.books())
        if route == ("POST", "/_sandbox/reset"):
            server.reset()
            return self.send_json(200, self.state())
        if route == ("GET", "/_sandbox/webhooks"):
            return self.send_json(200, {"webhooks": server.events.settings().as_dict()})
        if route == ("GET", "/_sandbox/events"):
            return self.send_json(200, {"data": server.events.events()})
        try:
            data = json.loads(body or b"{}")
            if route == ("POST", "/_sandbox/faults"):
                server.faults.replace(Faults.from_mapping(data))
                return self.send_json(200, {"faults": server.faults.current()})
            if route == ("POST", "/_sandbox/webhooks"):
                server.events.configure(WebhookSettings.from_mapping(data))
                return self.send_json(200, {"webhooks": server.events.settings().as_dict()})
            if route == ("POST", "/_sandbox/events/redeliver"):
                return self.redeliver(Redelivery.from_mapping(data))
            match = SETTLE_PATH.fullmatch(path)
            if self.command == "POST" and match:
                return self.settle(*match.groups(), data)
        except ValueError as exc:  # bad JSON, InvalidControl, a FaultError or a WebhookError
            return self.send_problem(400, "invalid_control", str(exc))
        self.send_problem(404, "resource_missing", f"no such control: {self.command} {path}")

    def state(self) -> dict:
        server = self.server
        return {
            **server.stats.snapshot(),
            **server.ledger.summary(),
            **server.events.summary(),
            "settlements_pending": server.settlements.pending(),
            "faults": server.faults.current(),
        }

    def redeliver(self, redelivery: Redelivery):
        try:
            sent = self.server.events.redeliver(redelivery)
        except KeyError as exc:
            return self.send_problem(404, "resource_missing", f"no such event: {exc.args[0]}")
        self.send_json(200, {"sent": sent})

    def settle(self, resource: str, object_id: str, data):
        if not isinstance(data, dict) or data.get("status") not in ("succeeded", "failed"):
            raise InvalidControl('settle needs {"status": "succeeded" | "failed"}')
        unknown = sorted(set(data) - {"status", *SETTLE_FIELDS[resource]})
        if unknown:
            raise InvalidControl(f"unknown settle fields: {', '.join(unknown)}")
        for name in SETTLE_FIELDS[resource]:
            if not isinstance(data.get(name), str | None):
                raise InvalidControl(f"{name} must be a string or null")
        ledger = self.server.ledger
        settle = ledger.settle_charge if resource == "charges" else ledger.settle_refund
        try:
            settled = settle(object_id, **data)
        except RefundRefused as exc:
            return self.send_problem(exc.status, exc.code, str(exc))
        if settled is None:
            return self.send_problem(404, "resource_missing", f"no such {resource[:-1]}")
        self.send_json(200, {resource[:-1]: settled})
