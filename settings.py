"""Every environment variable of the service, declared once, read into one immutable object.

Each field of :class:`Settings` is one variable: the field's annotation is its type, and
:func:`variable` gives its name, default, bounds and one line of meaning (the README's
configuration table is generated from these declarations: :func:`configuration_table`).

``Settings.__post_init__`` is the one validating path: ``load_settings`` (the service,
the CLI, gunicorn), ``Settings(...)`` and ``dataclasses.replace`` (code and tests) all
go through it. A bad value raises :class:`ConfigError` naming the variable, so a
misconfigured deployment stops at start-up, not at 3 a.m. Nothing else in the code base
reads ``os.environ`` for configuration.
"""

from __future__ import annotations

import math
import os
import threading
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
DEFAULT_DATABASE_URL = f"sqlite:///{ROOT / 'instance' / 'payments.db'}"
SANDBOX_PORT = 8081
DEFAULT_PAYMENT_API_URL = f"http://127.0.0.1:{SANDBOX_PORT}"
SANDBOX_API_KEY = "sk_sandbox_local"

#: The only retention periods CloudWatch Logs accepts (PutRetentionPolicy).
CLOUDWATCH_RETENTION_DAYS = (
    1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922,
    3288, 3653,
)  # fmt: skip
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A configuration variable has a value the service cannot run with."""


@dataclass(frozen=True)
class Derived:
    """A default computed from other (non-derived) settings; ``shown`` is how docs write it."""

    shown: str
    compute: Callable[[Settings], Any]


@dataclass(frozen=True)
class Variable:
    """How one environment variable becomes one ``Settings`` field.

    ``parse`` turns the variable's text into the field's value (default: by the field's
    type; comma-separated for a tuple); bounds and ``choices`` apply to the value, however
    it was given. A ``secret`` is left out of ``repr`` and of error messages. ``note``
    follows the default in the README (what an unset value means).
    """

    name: str
    help: str
    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False
    choices: tuple = ()
    parse: Callable[[str], Any] | None = None
    secret: bool = False
    note: str = ""


def variable(name: str, default: Any, help: str, **rules: Any) -> Any:
    """Declare a ``Settings`` field read from the environment variable ``name``."""
    declared = Variable(name, help, **rules)
    return field(default=default, repr=not declared.secret, metadata={"variable": declared})


THREADS_PER_WORKER = Derived("`GUNICORN_THREADS`", lambda s: s.gunicorn_threads)
# The bulkhead: a hung provider can occupy at most this many threads of a worker; the
# rest keep serving health checks and reads.
FEWER_THAN_THREADS = Derived(
    "3/4 of `GUNICORN_THREADS` (at least 1)", lambda s: max(1, s.gunicorn_threads * 3 // 4)
)


#: Defaults that depend on the provider: Stripe may take many seconds to confirm with an
#: issuer, and forgets an idempotency key after 24 hours; the sandbox keeps keys forever.
STRIPE_API_URL = "https://api.stripe.com"
PROVIDER_API_URL = Derived(
    "the sandbox; `https://api.stripe.com` for stripe",
    lambda s: STRIPE_API_URL if s.payment_provider == "stripe" else DEFAULT_PAYMENT_API_URL,
)
PROVIDER_READ_TIMEOUT = Derived(
    "`5`; `30` for stripe", lambda s: 30.0 if s.payment_provider == "stripe" else 5.0
)
PROVIDER_DEADLINE = Derived(
    "`15`; `60` for stripe", lambda s: 60.0 if s.payment_provider == "stripe" else 15.0
)
PROVIDER_KEY_RETENTION = Derived(
    "the provider's: `24` for stripe, unset (forever) for the sandbox",
    lambda s: 24.0 if s.payment_provider == "stripe" else None,
)


def _url(text: str) -> str:
    return text.rstrip("/")


def _retention(text: str) -> int | None:
    return int(text) or None  # 0: leave the log group's retention as it is


@dataclass(frozen=True)
class Settings:
    """The service's configuration (DESIGN.md section 8); see the README's table."""

    # fmt: off
    database_url: str = variable(
        "DATABASE_URL", DEFAULT_DATABASE_URL,
        "SQLAlchemy URL; production: `postgresql+psycopg2://...`", parse=_url,
        secret=True,  # it may carry the database password
    )
    db_pool: str = variable(
        "DB_POOL", "queue", "`queue`, or `null` for NullPool behind PgBouncer",
        choices=("queue", "null"), parse=str.lower,
    )
    db_pool_size: int = variable(
        "DB_POOL_SIZE", THREADS_PER_WORKER,
        "QueuePool `pool_size`: never smaller than the threads that use it",
        minimum=1, maximum=1000,
    )
    db_max_overflow: int = variable(
        "DB_MAX_OVERFLOW", 5, "QueuePool `max_overflow`", minimum=0, maximum=1000
    )
    db_pool_timeout: float = variable(
        "DB_POOL_TIMEOUT", 5.0,
        "seconds to wait for a pooled connection, then `DatabaseUnavailable`",
        positive=True, maximum=300,
    )
    db_pool_recycle: int = variable(
        "DB_POOL_RECYCLE", 1800, "seconds before a connection is replaced (`-1`: never)",
        minimum=-1,
    )
    db_statement_timeout_ms: int = variable(
        "DB_STATEMENT_TIMEOUT_MS", 5000, "PostgreSQL `statement_timeout` (`0`: none)", minimum=0
    )
    db_connect_timeout: int = variable(
        "DB_CONNECT_TIMEOUT", 3, "seconds to connect to PostgreSQL", minimum=1, maximum=60
    )

    payment_provider: str = variable(
        "PAYMENT_PROVIDER", "sandbox", "the provider adapter, one of `providers.PROVIDER_NAMES`",
        parse=str.lower,
    )
    payment_api_url: str = variable(
        "PAYMENT_API_URL", PROVIDER_API_URL, "provider base URL", parse=_url
    )
    payment_api_key: str = variable(
        "PAYMENT_API_KEY", SANDBOX_API_KEY, "provider secret (never logged)",
        secret=True, note="(the sandbox's)",
    )
    payment_connect_timeout: float = variable(
        "PAYMENT_CONNECT_TIMEOUT", 3.05, "seconds per connect", positive=True, maximum=60
    )
    payment_read_timeout: float = variable(
        "PAYMENT_READ_TIMEOUT", PROVIDER_READ_TIMEOUT, "seconds per attempt's read",
        positive=True, maximum=300,
    )
    payment_deadline: float = variable(
        "PAYMENT_DEADLINE", PROVIDER_DEADLINE,
        "seconds for all attempts of one payment; at least `PAYMENT_CONNECT_TIMEOUT`",
        positive=True, maximum=600,
    )
    payment_max_retries: int = variable(
        "PAYMENT_MAX_RETRIES", 3, "retries after the first attempt", minimum=0, maximum=20
    )
    payment_backoff_factor: float = variable(
        "PAYMENT_BACKOFF_FACTOR", 0.25, "seconds; exponential backoff with jitter",
        minimum=0, maximum=60,
    )
    payment_pool_maxsize: int = variable(
        "PAYMENT_POOL_MAXSIZE", FEWER_THAN_THREADS,
        "outbound connections per worker: the bulkhead", minimum=1, maximum=1000,
    )
    payment_pool_timeout: float = variable(
        "PAYMENT_POOL_TIMEOUT", 0.25, "seconds to wait for a free outbound connection",
        minimum=0, maximum=60,
    )
    payment_breaker_failures: int = variable(
        "PAYMENT_BREAKER_FAILURES", 5, "consecutive failures that open the breaker",
        minimum=1, maximum=1000,
    )
    payment_breaker_reset: float = variable(
        "PAYMENT_BREAKER_RESET", 30.0, "seconds open before a trial call",
        positive=True, maximum=3600,
    )
    payment_webhook_secret: str | None = variable(
        "PAYMENT_WEBHOOK_SECRET", None,
        "the secret provider events are signed with (sandbox: `whsec_...`; Stripe: the "
        "endpoint's signing secret)", secret=True, note="(webhooks refused)",
    )
    payment_key_retention: float | None = variable(
        "PAYMENT_KEY_RETENTION", PROVIDER_KEY_RETENTION,
        "hours the provider keeps an idempotency key; an older payment is looked up "
        "before it is re-submitted", positive=True, maximum=24 * 365,
    )
    payment_currency: str = variable(
        "PAYMENT_CURRENCY", "USD", "default currency (one of `money.CURRENCIES`)",
        parse=str.upper,
    )
    payment_max_amount: int = variable(
        "PAYMENT_MAX_AMOUNT", 1_000_000,
        "largest amount, in US dollars; other currencies: its equivalent at the rounded "
        "rates of `money.CURRENCIES` (a ceiling against typos and abuse)",
        minimum=1,
    )
    ca_bundle: str | None = variable(
        "REQUESTS_CA_BUNDLE", None,
        "a private CA for the provider's TLS (verification is always on)", note="(system CAs)",
    )

    api_keys: tuple[str, ...] = variable(
        "API_KEYS", (), "inbound bearer keys, comma-separated, 16+ characters each",
        secret=True, note="(required by the HTTP service)",
    )
    cloudwatch_log_group: str | None = variable(
        "CLOUDWATCH_LOG_GROUP", None,
        "log group; region/credentials/endpoint from the standard AWS variables",
        note="(no CloudWatch)",
    )
    cloudwatch_retention_days: int | None = variable(
        "CLOUDWATCH_RETENTION_DAYS", 30, "retention set on the log group (`0`: leave as is)",
        choices=CLOUDWATCH_RETENTION_DAYS, parse=_retention,
    )
    log_level: str = variable(
        "LOG_LEVEL", "INFO", "`DEBUG`, `INFO`, `WARNING`, `ERROR` or `CRITICAL`",
        choices=LOG_LEVELS, parse=str.upper,
    )
    gunicorn_workers: int = variable(
        "GUNICORN_WORKERS", 2, "worker processes", minimum=1, maximum=256
    )
    gunicorn_threads: int = variable(
        "GUNICORN_THREADS", 8, "threads per worker", minimum=1, maximum=512
    )
    port: int = variable("PORT", 8000, "port the service listens on", minimum=1, maximum=65535)
    redis_url: str | None = variable(
        "REDIS_URL", None, "when set, breaker state is shared by all workers and hosts",
        secret=True,
    )
    # fmt: on

    def __post_init__(self) -> None:
        derived = []
        for spec in _specs():
            value = getattr(self, spec.attribute)
            if isinstance(value, Derived):
                derived.append((spec, value))
            else:
                object.__setattr__(self, spec.attribute, spec.check(value))
        for spec, default in derived:  # after the values they are computed from
            object.__setattr__(self, spec.attribute, spec.check(default.compute(self)))
        self._check_together()

    def _check_together(self) -> None:
        """Rules beyond one value's type and bounds: other settings, modules, files."""
        if not self.database_url.startswith(("sqlite:", "postgresql")):
            raise ConfigError(
                "DATABASE_URL must start with sqlite: or postgresql "
                f"(it starts with {self.database_url.partition(':')[0][:20]!r})"
            )
        if not self.payment_api_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"PAYMENT_API_URL must start with http:// or https://, got {self.payment_api_url!r}"
            )
        if self.payment_deadline < self.payment_connect_timeout:
            raise ConfigError(
                f"PAYMENT_DEADLINE ({self.payment_deadline}) must be at least "
                f"PAYMENT_CONNECT_TIMEOUT ({self.payment_connect_timeout})"
            )
        if any(len(key) < 16 for key in self.api_keys):
            raise ConfigError("API_KEYS entries must be at least 16 characters long")
        from money import CURRENCIES  # imported here: both modules stay importable alone
        from providers import PROVIDER_NAMES

        if self.payment_currency not in CURRENCIES:
            raise ConfigError(
                f"PAYMENT_CURRENCY {self.payment_currency!r} is not a supported ISO 4217 currency"
            )
        if self.payment_provider not in PROVIDER_NAMES:
            raise ConfigError(
                f"PAYMENT_PROVIDER must be one of {', '.join(PROVIDER_NAMES)}, "
                f"got {self.payment_provider!r}"
            )
        if self.ca_bundle is not None and not os.path.exists(self.ca_bundle):
            raise ConfigError(
                f"REQUESTS_CA_BUNDLE names a file that does not exist: {self.ca_bundle}"
            )

    def with_overrides(self, **changes) -> Settings:
        """A validated copy with some fields changed (tests and tools).

        Derived defaults were computed when ``self`` was made: a copy keeps them, so pass
        ``db_pool_size`` too when changing ``gunicorn_threads``.
        """
        return replace(self, **changes)


_KIND_NAMES = {int: "a whole number", float: "a number", str: "text", tuple: "a list of text"}


@dataclass(frozen=True)
class _Spec:
    """A declared variable with its field's type, as validation and parsing need them."""

    attribute: str
    variable: Variable
    kind: type[Any]  # int, float, str or tuple
    optional: bool  # None is a valid value ("unset")

    def read(self, text: str) -> Any:
        """The value of the variable's text (stripped, non-empty)."""
        try:
            if self.variable.parse is not None:
                return self.variable.parse(text)
            if self.kind is tuple:
                return tuple(item.strip() for item in text.split(",") if item.strip())
            return self.kind(text)
        except ValueError:
            raise ConfigError(
                f"{self.variable.name} must be {_KIND_NAMES[self.kind]}, got {text!r}"
            ) from None

    def check(self, value: Any) -> Any:
        """``value`` if it has the field's type and is within bounds, else ``ConfigError``."""
        var = self.variable
        if value is None and self.optional:
            return None
        if self.kind is float and type(value) is int:
            value = float(value)
        if self.kind is tuple and isinstance(value, list):
            value = tuple(value)
        if (
            not isinstance(value, self.kind)
            or isinstance(value, bool)
            or (self.kind is tuple and not all(isinstance(item, str) for item in value))
        ):
            shown = type(value).__name__ if var.secret else repr(value)
            raise ConfigError(f"{var.name} must be {_KIND_NAMES[self.kind]}, got {shown}")
        if self.kind is float and not math.isfinite(value):
            raise ConfigError(f"{var.name} must be finite, got {value}")
        if var.positive and value <= 0:
            raise ConfigError(f"{var.name} must be greater than 0, got {value}")
        if var.minimum is not None and value < var.minimum:
            raise ConfigError(f"{var.name} must be at least {var.minimum}, got {value}")
        if var.maximum is not None and value > var.maximum:
            raise ConfigError(f"{var.name} must be at most {var.maximum}, got {value}")
        if var.choices and value not in var.choices:
            listed = ", ".join(map(str, var.choices))
            raise ConfigError(f"{var.name} must be one of {listed}, got {value!r}")
        return value


@cache
def _specs() -> tuple[_Spec, ...]:
    hints = typing.get_type_hints(Settings)
    specs = []
    for f in fields(Settings):
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else hint
        kind = typing.get_origin(base) or base
        specs.append(_Spec(f.name, f.metadata["variable"], kind, optional))
    return tuple(specs)


def variables() -> tuple[tuple[Variable, Any], ...]:
    """Every declared variable with its default (a value, ``None`` or a ``Derived``)."""
    return tuple((f.metadata["variable"], f.default) for f in fields(Settings))


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the configuration from ``env`` (default: the process environment).

    An unset or blank variable takes its default.
    """
    env = os.environ if env is None else env
    values = {}
    for spec in _specs():
        text = (env.get(spec.variable.name) or "").strip()
        if text:
            values[spec.attribute] = spec.read(text)
    return Settings(**values)


def configuration_table() -> str:
    """The README's configuration table (markdown), one row per declared variable."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for var, default in variables():
        shown = " ".join(filter(None, (_shown_default(default), var.note)))
        rows.append(f"| `{var.name}` | {shown} | {var.help} |")
    return "\n".join(rows) + "\n"


def _shown_default(default: Any) -> str:
    if isinstance(default, Derived):
        return default.shown
    if default is None:
        return "unset"
    if default == ():
        return "none"
    if isinstance(default, float):
        return f"`{default:g}`"
    return f"`{str(default).replace(str(ROOT), '<repo>')}`"


_lock = threading.Lock()
_current: Settings | None = None


def get_settings() -> Settings:
    """The process's settings, loaded from the environment on first use."""
    global _current
    if _current is None:
        with _lock:
            if _current is None:
                _current = load_settings()
    return _current


def set_settings(settings: Settings | None) -> None:
    """Replace the process's settings (``None``: reload from the environment on next use)."""
    global _current
    with _lock:
        _current = settings
