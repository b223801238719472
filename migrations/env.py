"""Alembic environment: which database to migrate, and how to connect to it.

The URL is, in order: one set programmatically (``database_config.run_migrations``
puts it in ``config.attributes["database_url"]``), ``sqlalchemy.url`` on the Config,
else ``DATABASE_URL`` read through ``settings.load_settings()``. The engine is the
service's own (same SQLite pragmas, connect timeout), without a pool and without a
statement timeout, so a long migration is not cancelled.
"""

import logging

from alembic import context

import database_config
import settings

config = context.config
target_metadata = database_config.metadata


def database_url() -> str:
    return (
        config.attributes.get("database_url")
        or config.get_main_option("sqlalchemy.url")
        or settings.load_settings().database_url
    )


def run_migrations_offline() -> None:
    """Print the SQL (``alembic upgrade head --sql``) instead of running it."""
    url = database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = database_url()
    engine = database_config.build_engine(
        settings.Settings(database_url=url, db_pool="null", db_statement_timeout_ms=0)
    )
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=engine.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if config.cmd_opts is not None:  # the alembic CLI: show progress; the service logs its own way
    logging.basicConfig(level=logging.INFO, format="%(levelname)-5s [%(name)s] %(message)s")

if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
