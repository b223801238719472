"""gunicorn's own error answers as problem+json instead of an HTML page.

gunicorn answers a request it cannot parse (bad request line, header or chunk, a line or
headers over its limits) itself, before the app sees it, through
``gunicorn.util.write_error``, which writes HTML. The API promises problem+json for every
error, so each worker replaces that one function (the workers look it up at call time);
the status and the log line stay gunicorn's.
"""

from __future__ import annotations

import json

from gunicorn import util

PROBLEM_MIMETYPE = "application/problem+json"


def write_problem(sock, status_int: int, reason: str, mesg: str) -> None:
    """Drop-in for ``gunicorn.util.write_error``: same status, a problem+json body."""
    body = json.dumps(
        {
            "type": "about:blank",
            "title": reason,
            "status": status_int,
            "detail": (mesg or reason)[:500],
            "code": reason.lower().replace(" ", "_"),
        }
    ).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\n"
        "Connection: close\r\n"
        f"Content-Type: {PROBLEM_MIMETYPE}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


def install() -> None:
    """Make this process's gunicorn worker answer its own errors as problem+json."""
    util.write_error = write_problem
