"""A local payment provider speaking DESIGN.md section 5, with faults on demand.

Run it as ``python -m sandbox_provider --port 0``: it prints ``sandbox listening on
<url>`` once it accepts connections. Tests, demos and benchmarks point
``PAYMENT_API_URL`` at it and steer it through ``/_sandbox/faults``.
"""

from sandbox_provider.faults import Faults
from sandbox_provider.server import SandboxServer

__all__ = ["Faults", "SandboxServer"]
