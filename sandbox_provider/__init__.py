"""A local payment provider speaking DESIGN.md section 5a, with faults on demand.

Charges and refunds, idempotent by key; pending ones settle later and every settled one
is announced by a signed event (section 11) when a webhook URL is set. Run it as
``python -m sandbox_provider --port 0``: it prints ``sandbox listening on <url>`` once
it accepts connections. Tests, demos and benchmarks point ``PAYMENT_API_URL`` at it and
steer it through the ``/_sandbox`` controls (:mod:`sandbox_provider.controls`).
"""

from sandbox_provider.faults import Faults
from sandbox_provider.server import SandboxServer

__all__ = ["Faults", "SandboxServer"]
