"""Configuration is read once, typed, and a bad value names its variable."""

import pytest

from settings import ConfigError, load_settings


def test_defaults_follow_the_design_table():
    s = load_settings({})
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith(
        "instance/payments.db"
    )
    assert (s.db_pool, s.db_max_overflow, s.db_pool_timeout, s.db_pool_recycle) == (
        "queue",
        5,
        5.0,
        1800,
    )
    assert s.db_statement_timeout_ms == 5000
    assert (s.payment_connect_timeout, s.payment_read_timeout, s.payment_deadline) == (3.05, 5, 15)
    assert (s.payment_max_retries, s.payment_backoff_factor) == (3, 0.25)
    assert (s.payment_pool_timeout, s.payment_breaker_failures, s.payment_breaker_reset) == (
        0.25,
        5,
        30,
    )
    assert (s.payment_currency, s.payment_max_amount) == ("USD", 1_000_000)
    assert (s.gunicorn_workers, s.gunicorn_threads, s.port) == (2, 8, 8000)
    assert s.api_keys == () and s.cloudwatch_log_group is None and s.redis_url is None


def test_pools_derive_from_threads():
    s = load_settings({"GUNICORN_THREADS": "32"})
    assert s.db_pool_size == 32  # never smaller than the threads that use it
    assert s.payment_pool_maxsize < 32  # the bulkhead leaves threads for health checks
    assert load_settings({"GUNICORN_THREADS": "1"}).payment_pool_maxsize == 1


def test_secrets_are_not_in_the_repr():
    s = load_settings({"PAYMENT_API_KEY": "sk_live_secret", "API_KEYS": "inbound-key-0123456789"})
    assert "sk_live_secret" not in repr(s) and "inbound-key" not in repr(s)
    assert s.api_keys == ("inbound-key-0123456789",)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DB_POOL_SIZE", "ten"),
        ("DB_POOL_SIZE", "0"),
        ("DB_POOL", "lifo"),
        ("DB_POOL_TIMEOUT", "-1"),
        ("PAYMENT_READ_TIMEOUT", "nan"),
        ("PAYMENT_CONNECT_TIMEOUT", "0"),
        ("PAYMENT_MAX_RETRIES", "-2"),
        ("PAYMENT_API_URL", "ftp://provider"),
        ("DATABASE_URL", "mysql://x"),
        ("PAYMENT_CURRENCY", "XYZ"),
        ("LOG_LEVEL", "LOUD"),
        ("PORT", "70000"),
        ("GUNICORN_THREADS", "0"),
        ("API_KEYS", "short"),
        ("REQUESTS_CA_BUNDLE", "/nonexistent/ca.pem"),
        ("CLOUDWATCH_RETENTION_DAYS", "10"),
    ],
)
def test_bad_value_names_the_variable(variable, value):
    with pytest.raises(ConfigError, match=variable):
        load_settings({variable: value})


def test_deadline_shorter_than_connect_timeout_is_refused():
    with pytest.raises(ConfigError, match="PAYMENT_DEADLINE"):
        load_settings({"PAYMENT_DEADLINE": "1", "PAYMENT_CONNECT_TIMEOUT": "3"})
