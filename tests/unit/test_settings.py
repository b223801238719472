"""Configuration is read once, typed, and a bad value names its variable."""

from dataclasses import replace
from pathlib import Path

import pytest

from providers import PROVIDER_NAMES
from settings import ConfigError, Settings, configuration_table, load_settings, variables

README = Path(__file__).resolve().parents[2] / "README.md"


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
    assert s.payment_provider == "sandbox"
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
        ("CLOUDWATCH_RETENTION_DAYS", "-1"),
        ("PAYMENT_PROVIDER", "paypal"),
        ("PAYMENT_MAX_AMOUNT", "0"),
        ("API_KEYS", "inbound-key-0123456789,short"),
    ],
)
def test_bad_value_names_the_variable(variable, value):
    with pytest.raises(ConfigError, match=variable):
        load_settings({variable: value})


def test_deadline_shorter_than_connect_timeout_is_refused():
    with pytest.raises(ConfigError, match="PAYMENT_DEADLINE"):
        load_settings({"PAYMENT_DEADLINE": "1", "PAYMENT_CONNECT_TIMEOUT": "3"})


def test_unknown_provider_is_refused_with_the_known_ones_listed():
    with pytest.raises(ConfigError, match="PAYMENT_PROVIDER") as info:
        load_settings({"PAYMENT_PROVIDER": "paypal"})
    assert all(name in str(info.value) for name in PROVIDER_NAMES)


def test_text_is_normalised_and_blank_means_default():
    s = load_settings(
        {
            "PAYMENT_CURRENCY": " eur ",
            "LOG_LEVEL": "debug",
            "DB_POOL": "NULL",
            "PAYMENT_API_URL": "https://provider.test/",
            "CLOUDWATCH_RETENTION_DAYS": "0",
            "API_KEYS": " key-one-0123456789abcdef , ,key-two-0123456789abcdef",
            "PAYMENT_DEADLINE": "   ",
        }
    )
    assert (s.payment_currency, s.log_level, s.db_pool) == ("EUR", "DEBUG", "null")
    assert s.payment_api_url == "https://provider.test"
    assert s.cloudwatch_retention_days is None  # 0: leave the log group's retention alone
    assert s.api_keys == ("key-one-0123456789abcdef", "key-two-0123456789abcdef")
    assert s.payment_deadline == 15


def test_environment_and_code_share_one_set_of_defaults():
    assert load_settings({}) == Settings()


def test_each_variable_is_declared_once():
    names = [var.name for var, _ in variables()]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    "build",
    [
        lambda: Settings(db_pool_size=0),
        lambda: replace(Settings(), db_pool_size=0),
        lambda: Settings().with_overrides(db_pool_size=0),
        lambda: Settings(db_pool_size="8"),
        lambda: Settings(db_pool_size=True),
    ],
)
def test_settings_made_in_code_are_validated_like_the_environment(build):
    with pytest.raises(ConfigError, match="DB_POOL_SIZE"):
        build()


def test_cross_field_rules_hold_for_settings_made_in_code():
    with pytest.raises(ConfigError, match="PAYMENT_DEADLINE"):
        Settings(payment_deadline=1.0)  # below the default PAYMENT_CONNECT_TIMEOUT
    assert Settings(payment_deadline=1.0, payment_connect_timeout=0.5).payment_deadline == 1.0


def test_a_secret_of_the_wrong_type_is_not_echoed():
    with pytest.raises(ConfigError, match="PAYMENT_API_KEY") as info:
        Settings(payment_api_key=b"sk_live_secret")
    assert "sk_live_secret" not in str(info.value)


def test_make_settings_refuses_an_out_of_bounds_override(make_settings):
    with pytest.raises(ConfigError, match="PAYMENT_MAX_RETRIES"):
        make_settings(payment_max_retries=-1)


def test_make_settings_derives_the_pools_from_overridden_threads(make_settings):
    s = make_settings(gunicorn_threads=4)
    assert (s.db_pool_size, s.payment_pool_maxsize) == (4, 3)


def test_readme_configuration_table_is_the_declared_variables():
    section = README.read_text().split("\n## Configuration\n", 1)[1].split("\n#", 1)[0]
    documented = "".join(line + "\n" for line in section.splitlines() if line.startswith("|"))
    assert documented == configuration_table(), (
        "README's configuration table differs from settings.py: paste "
        "settings.configuration_table() into the README's ## Configuration section"
    )
