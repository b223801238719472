"""Payment providers: one adapter module per provider, chosen by ``PAYMENT_PROVIDER``.

Each module builds its provider's requests and translates the answers into the neutral
types of :mod:`providers.base`; retries, deadline, breaker and audit are not theirs
(``payment_client``). Nothing outside this package knows a provider's wire format.
"""

from __future__ import annotations

#: ``PAYMENT_PROVIDER`` values and the module that implements each.
PROVIDER_MODULES = {"sandbox": "providers.sandbox"}
PROVIDER_NAMES = tuple(PROVIDER_MODULES)
