"""Throwaway PostgreSQL databases for tests: each test gets an empty one of its own."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

SERVER_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432"
ADMIN_URL = f"{SERVER_URL}/postgres"


@contextmanager
def temporary_database() -> Iterator[str]:
    """Create ``t_<random hex>``, yield its URL, then drop it (ending its sessions first)."""
    name = f"t_{secrets.token_hex(8)}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield f"{SERVER_URL}/{name}"
        finally:
            with admin.connect() as connection:
                connection.exec_driver_sql(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %(name)s AND pid <> pg_backend_pid()",
                    {"name": name},
                )
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()
