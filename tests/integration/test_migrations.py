"""Alembic owns the schema: revision 0001 builds exactly ``database_config.metadata``."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

import database_config as db
from tests.support.postgres import temporary_database

TABLES = {
    "payments",
    "payment_attempts",
    "payment_events",
    "refunds",
    "refund_attempts",
    "refund_events",
    "provider_events",
}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'instance' / 'payments.db'}"
    else:
        with temporary_database() as url:
            yield url


def inspect_schema(url: str, look):
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return look(connection)
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    return inspect_schema(url, lambda connection: set(inspect(connection).get_table_names()))


def alembic_config(url: str, **kwargs) -> Config:
    config = Config(str(db.ROOT / "alembic.ini"), **kwargs)
    config.attributes["database_url"] = url
    return config


def test_upgrade_creates_the_tables_and_the_idempotency_constraint(database_url):
    db.run_migrations(database_url)
    db.run_migrations(database_url)  # already at head: nothing to do

    assert table_names(database_url) == TABLES | {"alembic_version"}
    unique = inspect_schema(
        database_url, lambda connection: inspect(connection).get_unique_constraints("payments")
    )
    assert [(u["name"], u["column_names"]) for u in unique] == [
        ("uq_payments_idempotency_key", ["idempotency_key"])
    ]


def test_migrated_schema_matches_the_table_definitions(database_url):
    db.run_migrations(database_url)

    def differences(connection):
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        return compare_metadata(context, db.metadata)

    assert inspect_schema(database_url, differences) == []


@pytest.mark.parametrize(
    "reserved, refunded",
    [(1001, 0), (500, 501), (-1, -1), (0, -1)],
    ids=["reserved over the amount", "refunded over reserved", "negative", "negative refunded"],
)
def test_the_database_refuses_refunds_beyond_the_payment(database_url, reserved, refunded):
    db.run_migrations(database_url)
    engine = create_engine(database_url, poolclass=NullPool)
    now = db.utcnow()
    row = dict(
        id="pay_" + "0" * 24, idempotency_key="k", transaction_id="t", request_fingerprint="f",
        amount_minor=1000, currency="USD", payment_method="card", status="succeeded",
        created_at=now, updated_at=now,
    )  # fmt: skip
    try:
        with engine.begin() as connection:
            connection.execute(db.payments.insert(), row)
            connection.execute(
                db.payments.update().values(refund_reserved_minor=1000, amount_refunded_minor=1000)
            )  # the whole amount is fine
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(
                db.payments.update().values(
                    refund_reserved_minor=reserved, amount_refunded_minor=refunded
                )
            )
    finally:
        engine.dispose()


def test_downgrade_to_base_drops_the_tables(database_url):
    db.run_migrations(database_url)
    command.downgrade(alembic_config(database_url), "base")
    assert table_names(database_url) == {"alembic_version"}


def test_run_migrations_leaves_the_application_logging_alone(tmp_path):
    root = logging.getLogger()
    before = (root.level, list(root.handlers), logging.getLogger("alembic").level)
    db.run_migrations(f"sqlite:///{tmp_path / 'payments.db'}")
    assert (root.level, list(root.handlers), logging.getLogger("alembic").level) == before


def test_offline_mode_prints_the_schema_sql(tmp_path):
    output = io.StringIO()
    config = alembic_config(f"sqlite:///{tmp_path / 'never-created.db'}", output_buffer=output)
    command.upgrade(config, "head", sql=True)
    assert "CREATE TABLE payments" in output.getvalue()
    assert "uq_payments_idempotency_key" in output.getvalue()
    assert not (tmp_path / "never-created.db").exists()


@pytest.mark.postgres
def test_alembic_cli_migrates_the_database_named_by_DATABASE_URL():  # noqa: N802
    with temporary_database() as url:
        completed = subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=db.ROOT,
            env={**os.environ, "DATABASE_URL": url},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert completed.returncode == 0, completed.stderr
        assert "Running upgrade  -> 0001" in completed.stderr
        assert table_names(url) == TABLES | {"alembic_version"}
