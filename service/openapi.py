"""``GET /openapi.json``: the API contract, kept in the repository and served verbatim.

Tests validate the document and check live responses against its schemas, so it cannot
silently drift from the code.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from flask import Blueprint, Response

DOCUMENT = Path(__file__).with_name("openapi.json")

bp = Blueprint("openapi", __name__)


@cache
def document() -> bytes:
    return DOCUMENT.read_bytes()


@bp.get("/openapi.json")
def serve_openapi() -> Response:
    return Response(document(), mimetype="application/json")
