"""Every environment variable of DESIGN.md section 8, read once into one immutable object.

Nothing else in the code base reads ``os.environ`` for configuration: modules take a
``Settings`` (or call :func:`get_settings`). A bad value raises :class:`ConfigError`
naming the variable, so a misconfigured deployment stops at start-up, not at 3 a.m.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_SQLITE_PATH = ROOT / "instance" / "payments.db"
DEFAULT_DATABASE_URL = f"sqlite:///{DEFAULT_SQLITE_PATH}"
SANDBOX_PORT = 8081
DEFAULT_PAYMENT_API_URL = f"http://127.0.0.1:{SANDBOX_PORT}"
SANDBOX_API_KEY = "sk_sandbox_local"


#: The only retention periods CloudWatch Logs accepts (PutRetentionPolicy).
CLOUDWATCH_RETENTION_DAYS = (
    1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922,
    3288, 3653,
)  # fmt: skip


class ConfigError(ValueError):
    """A configuration variable has a value the service cannot run with."""


@dataclass(frozen=True)
class Settings:
    """The service's configuration; see the README's configuration table."""

    database_url: str = DEFAULT_DATABASE_URL
    db_pool: str = "queue"
    db_pool_size: int = 8
    db_max_overflow: int = 5
    db_pool_timeout: float = 5.0
    db_pool_recycle: int = 1800
    db_statement_timeout_ms: int = 5000
    db_connect_timeout: int = 3

    payment_api_url: str = DEFAULT_PAYMENT_API_URL
    payment_api_key: str = field(default=SANDBOX_API_KEY, repr=False)
    payment_connect_timeout: float = 3.05
    payment_read_timeout: float = 5.0
    payment_deadline: float = 15.0
    payment_max_retries: int = 3
    payment_backoff_factor: float = 0.25
    payment_pool_maxsize: int = 6
    payment_pool_timeout: float = 0.25
    payment_breaker_failures: int = 5
    payment_breaker_reset: float = 30.0
    payment_currency: str = "USD"
    payment_max_amount: int = 1_000_000

    api_keys: tuple[str, ...] = field(default=(), repr=False)
    cloudwatch_log_group: str | None = None
    cloudwatch_retention_days: int | None = 30
    log_level: str = "INFO"
    gunicorn_workers: int = 2
    gunicorn_threads: int = 8
    port: int = 8000
    redis_url: str | None = field(default=None, repr=False)
    ca_bundle: str | None = None  # REQUESTS_CA_BUNDLE: a private CA for the provider's TLS

    @property
    def is_postgres(self) -> bool:
        return self.database_url.startswith("postgresql")

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def with_overrides(self, **changes) -> Settings:
        """Return a copy with some fields changed (tests and tools)."""
        return replace(self, **changes)


def default_pool_maxsize(threads: int) -> int:
    """Outbound connections per worker: fewer than its threads, the bulkhead.

    A hung provider can then occupy at most this many threads; the rest keep
    serving health checks and reads.
    """
    return max(1, threads * 3 // 4)


def _text(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip()


def _int(env, name, default, minimum=None, maximum=None) -> int:
    raw = _text(env, name, None)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    _check_range(name, value, minimum, maximum)
    return value


def _float(env, name, default, minimum=None, maximum=None, positive=False) -> float:
    raw = _text(env, name, None)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {raw!r}")
    if positive and value <= 0:
        raise ConfigError(f"{name} must be greater than 0, got {raw!r}")
    _check_range(name, value, minimum, maximum)
    return value


def _check_range(name, value, minimum, maximum) -> None:
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, got {value}")


def _choice(env, name, default, choices) -> str:
    value = (_text(env, name, default) or default).lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(sorted(choices))}, got {value!r}")
    return value


def _url(env, name, default, schemes) -> str:
    value = _text(env, name, default)
    if not value.startswith(schemes):
        raise ConfigError(f"{name} must start with one of {', '.join(schemes)}, got {value!r}")
    return value.rstrip("/")


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the configuration from ``env`` (default: the process environment)."""
    env = os.environ if env is None else env
    threads = _int(env, "GUNICORN_THREADS", 8, minimum=1, maximum=512)
    workers = _int(env, "GUNICORN_WORKERS", 2, minimum=1, maximum=256)

    connect_timeout = _float(env, "PAYMENT_CONNECT_TIMEOUT", 3.05, positive=True, maximum=60)
    read_timeout = _float(env, "PAYMENT_READ_TIMEOUT", 5.0, positive=True, maximum=300)
    deadline = _float(env, "PAYMENT_DEADLINE", 15.0, positive=True, maximum=600)
    if deadline < connect_timeout:
        raise ConfigError(
            f"PAYMENT_DEADLINE ({deadline}) must be at least PAYMENT_CONNECT_TIMEOUT "
            f"({connect_timeout})"
        )

    api_keys = tuple(k.strip() for k in (_text(env, "API_KEYS", "") or "").split(",") if k.strip())
    short = [k for k in api_keys if len(k) < 16]
    if short:
        raise ConfigError("API_KEYS entries must be at least 16 characters long")

    log_level = (_text(env, "LOG_LEVEL", "INFO") or "INFO").upper()
    if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ConfigError(
            f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {log_level!r}"
        )

    currency = (_text(env, "PAYMENT_CURRENCY", "USD") or "USD").upper()
    from money import CURRENCY_EXPONENTS  # local: money imports nothing from here

    if currency not in CURRENCY_EXPONENTS:
        raise ConfigError(f"PAYMENT_CURRENCY {currency!r} is not a supported ISO 4217 currency")

    retention = _text(env, "CLOUDWATCH_RETENTION_DAYS", "30")
    retention_days = (
        None if retention == "0" else _int(env, "CLOUDWATCH_RETENTION_DAYS", 30, minimum=0)
    )
    if retention_days is not None and retention_days not in CLOUDWATCH_RETENTION_DAYS:
        raise ConfigError(
            "CLOUDWATCH_RETENTION_DAYS must be 0 (leave as is) or one of the values CloudWatch "
            f"accepts ({', '.join(map(str, CLOUDWATCH_RETENTION_DAYS))}), got {retention_days}"
        )

    return Settings(
        database_url=_url(env, "DATABASE_URL", DEFAULT_DATABASE_URL, ("sqlite:", "postgresql")),
        db_pool=_choice(env, "DB_POOL", "queue", {"queue", "null"}),
        db_pool_size=_int(env, "DB_POOL_SIZE", threads, minimum=1, maximum=1000),
        db_max_overflow=_int(env, "DB_MAX_OVERFLOW", 5, minimum=0, maximum=1000),
        db_pool_timeout=_float(env, "DB_POOL_TIMEOUT", 5.0, positive=True, maximum=300),
        db_pool_recycle=_int(env, "DB_POOL_RECYCLE", 1800, minimum=-1),
        db_statement_timeout_ms=_int(env, "DB_STATEMENT_TIMEOUT_MS", 5000, minimum=0),
        db_connect_timeout=_int(env, "DB_CONNECT_TIMEOUT", 3, minimum=1, maximum=60),
        payment_api_url=_url(
            env, "PAYMENT_API_URL", DEFAULT_PAYMENT_API_URL, ("http://", "https://")
        ),
        payment_api_key=_text(env, "PAYMENT_API_KEY", SANDBOX_API_KEY),
        payment_connect_timeout=connect_timeout,
        payment_read_timeout=read_timeout,
        payment_deadline=deadline,
        payment_max_retries=_int(env, "PAYMENT_MAX_RETRIES", 3, minimum=0, maximum=20),
        payment_backoff_factor=_float(env, "PAYMENT_BACKOFF_FACTOR", 0.25, minimum=0, maximum=60),
        payment_pool_maxsize=_int(
            env, "PAYMENT_POOL_MAXSIZE", default_pool_maxsize(threads), minimum=1, maximum=1000
        ),
        payment_pool_timeout=_float(env, "PAYMENT_POOL_TIMEOUT", 0.25, minimum=0, maximum=60),
        payment_breaker_failures=_int(env, "PAYMENT_BREAKER_FAILURES", 5, minimum=1, maximum=1000),
        payment_breaker_reset=_float(
            env, "PAYMENT_BREAKER_RESET", 30.0, positive=True, maximum=3600
        ),
        payment_currency=currency,
        payment_max_amount=_int(env, "PAYMENT_MAX_AMOUNT", 1_000_000, minimum=1),
        api_keys=api_keys,
        cloudwatch_log_group=_text(env, "CLOUDWATCH_LOG_GROUP", None),
        cloudwatch_retention_days=retention_days,
        log_level=log_level,
        gunicorn_workers=workers,
        gunicorn_threads=threads,
        port=_int(env, "PORT", 8000, minimum=1, maximum=65535),
        redis_url=_text(env, "REDIS_URL", None),
        ca_bundle=_ca_bundle(env),
    )


def _ca_bundle(env: Mapping[str, str]) -> str | None:
    path = _text(env, "REQUESTS_CA_BUNDLE", None) or _text(env, "CURL_CA_BUNDLE", None)
    if path is not None and not os.path.exists(path):
        raise ConfigError(f"REQUESTS_CA_BUNDLE names a file that does not exist: {path}")
    return path


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
