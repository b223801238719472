"""One id per request: taken from ``X-Request-ID`` when sane, else generated.

It is echoed in the response, put in every problem body and bound into the log context
for the whole request, so a client's complaint, the access log and the application log
meet on one id. A caller-supplied id is accepted only if it is short and plain: it ends
up in log lines and headers, where anything else could forge or break them.
"""

from __future__ import annotations

import re
import uuid
from contextlib import ExitStack

from flask import Flask, Response, g, request

from log_context import bind_log_context

HEADER = "X-Request-ID"
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def init_app(app: Flask) -> None:
    app.before_request(begin_request)
    app.after_request(echo_request_id)
    app.teardown_request(end_request)


def current_request_id() -> str | None:
    """The id of the request being served (``None`` outside a request)."""
    return g.get("request_id") if g else None


def begin_request() -> None:
    supplied = request.headers.get(HEADER, "")
    g.request_id = supplied if VALID_REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex
    g.request_log_context = ExitStack()
    g.request_log_context.enter_context(bind_log_context(request_id=g.request_id))


def echo_request_id(response: Response) -> Response:
    if "request_id" in g:
        response.headers[HEADER] = g.request_id
    return response


def end_request(_exc: BaseException | None) -> None:
    stack = g.pop("request_log_context", None)
    if stack is not None:
        stack.close()
