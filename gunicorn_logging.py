"""gunicorn's own logs (error log, access log) as the service's JSON lines.

Its own module because only gunicorn loads it, by name, in the master
(``logger_class = "gunicorn_logging.GunicornJsonLogger"``); the service and the CLI log
without importing gunicorn.
"""

from __future__ import annotations

import logging

from gunicorn import glogging

import logging_setup
from settings import get_settings


class GunicornJsonLogger(glogging.Logger):
    """gunicorn's error and access logs as JSON through the root logger's handlers.

    Use as ``logger_class``; gunicorn's stdout/stderr handlers are removed and its
    loggers propagate. File or syslog outputs, when configured, get the same JSON
    format and redaction.
    """

    def setup(self, cfg) -> None:
        super().setup(cfg)
        logging_setup.configure_master_logging(get_settings())
        for log in (self.error_log, self.access_log):
            for handler in list(log.handlers):
                if not getattr(handler, "_gunicorn", False):
                    continue
                if type(handler) is logging.StreamHandler:
                    log.removeHandler(handler)
                elif not handler.filters:
                    logging_setup.prepare_handler(handler)
            log.propagate = True
