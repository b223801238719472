"""``flask --app wsgi payments ...``: operator commands that run beside the service.

``payments reconcile`` settles ``pending``/``unknown`` payments and refunds with the
provider, and applies provider events a crash left stored but unapplied (run it from
cron; several hosts at once are safe). ``payments migrate`` brings the schema to
the latest Alembic revision. Both use the service's configuration, ``API_KEYS``
included (the app refuses to load without it), and log like the service does, so a cron
job's reconciliations land in the same place as the requests that left them unknown.
"""

from __future__ import annotations

import json

import click
from flask import Flask
from flask.cli import AppGroup

import database_config
import logging_setup
import payment_handler
import provider_events
from settings import get_settings


@click.group("payments", cls=AppGroup)
def payments_cli() -> None:
    """Payment maintenance commands (logs: JSON on stderr, and CloudWatch when configured)."""
    logging_setup.configure_logging(get_settings())
    click.get_current_context().call_on_close(logging_setup.shutdown_logging)


def init_app(app: Flask) -> None:
    app.cli.add_command(payments_cli)


@payments_cli.command("reconcile")
@click.option(
    "--older-than",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Only payments not updated for this many seconds.",
)
def reconcile(older_than: float) -> None:
    """Settle pending and unknown payments and refunds with the provider, and apply
    events left unapplied; print the report as JSON.

    One pass: each payment is looked up at most once, and the run ends early while the
    provider is unavailable. Exits with status 1 when some lookups failed or were put
    off (the next run retries them), so cron and alerting notice.
    """
    report = payment_handler.reconcile_payments(older_than_seconds=older_than)
    service = payment_handler.get_payment_service()
    events = provider_events.get_webhook_receiver(service)
    applied = events.applier.apply_unapplied(events.events, database_config.utcnow())
    click.echo(json.dumps({**report.to_dict(), "events_applied": applied}, sort_keys=True))
    refunds = report.refunds
    if report.errors or report.deferred or (refunds and (refunds.errors or refunds.deferred)):
        raise click.exceptions.Exit(1)


@payments_cli.command("migrate")
def migrate() -> None:
    """Upgrade the database schema to the latest revision (alembic upgrade head)."""
    database_config.run_migrations()
    click.echo("database schema is up to date")
