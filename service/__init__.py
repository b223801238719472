"""The HTTP API of DESIGN.md section 6: ``create_app()`` builds it (``wsgi.py`` serves it).

Configuration comes from ``settings.get_settings()`` (environment variables, read once).
``test_config`` overrides Flask config keys, e.g. ``{"API_KEYS": ("k" * 16,)}``.

The app refuses to start without inbound ``API_KEYS``: a payment API that accepts
anonymous charges must never come up by accident. The quickstart sets a key explicitly.
"""

from __future__ import annotations

from flask import Flask

from service import (
    cli,
    health,
    http_metrics,
    openapi,
    payments,
    problems,
    refunds,
    request_id,
    webhooks,
)
from settings import ConfigError, get_settings

#: Largest accepted request body; a payment request is well under 1 KiB.
MAX_CONTENT_LENGTH = 64 * 1024
#: Seconds ``/readyz`` waits for the database before reporting it down.
READINESS_DB_TIMEOUT = 1.0
#: Seconds a client may stall while sending a request body before it gets 408: a gthread
#: worker gives each request a thread, and stalled uploads must not hold them all.
BODY_READ_TIMEOUT = 2.0


def create_app(test_config=None) -> Flask:
    """Build the app: defaults from the settings, then ``test_config``, then the modules."""
    app = Flask(__name__)
    settings = get_settings()
    app.config.from_mapping(
        MAX_CONTENT_LENGTH=MAX_CONTENT_LENGTH,
        API_KEYS=settings.api_keys,
        READINESS_DB_TIMEOUT=READINESS_DB_TIMEOUT,
        BODY_READ_TIMEOUT=BODY_READ_TIMEOUT,
        PROBLEM_TYPE_BASE=problems.DEFAULT_TYPE_BASE,
    )
    if test_config is not None:
        app.config.from_mapping(test_config)
    if not app.config["API_KEYS"]:
        raise ConfigError(
            "API_KEYS is empty: set at least one inbound bearer key (comma-separated, "
            "16+ characters each); the service does not accept unauthenticated payments"
        )

    request_id.init_app(app)
    http_metrics.init_app(app)
    problems.init_app(app)
    cli.init_app(app)
    app.register_blueprint(payments.bp)
    app.register_blueprint(refunds.bp)
    app.register_blueprint(webhooks.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    return app
