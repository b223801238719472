"""Payment providers: one adapter module per provider, chosen by ``PAYMENT_PROVIDER``.

Each module builds its provider's requests and translates the answers into the neutral
types of :mod:`providers.base`; retries, deadline, breaker and audit are not theirs
(``payment_client``). Nothing outside this package knows a provider's wire format.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # this module imports nothing at run time: settings validates names here
    from providers.base import PaymentProvider
    from settings import Settings

#: ``PAYMENT_PROVIDER`` values and the adapter class that implements each.
PROVIDER_CLASSES = {
    "sandbox": "providers.sandbox:SandboxProvider",
    "stripe": "providers.stripe:StripeProvider",
}
PROVIDER_NAMES = tuple(PROVIDER_CLASSES)


def load_provider(settings: Settings) -> PaymentProvider:
    """The adapter ``PAYMENT_PROVIDER`` names, built from the settings."""
    module_name, _, class_name = PROVIDER_CLASSES[settings.payment_provider].partition(":")
    provider_class = getattr(importlib.import_module(module_name), class_name)
    return provider_class(settings)
