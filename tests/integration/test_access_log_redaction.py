"""A card number in a request's URL never reaches gunicorn's access log (real gunicorn).

gunicorn writes the request line as the client sent it, URL-encoded; the access log
goes through the same redaction as every other record.
"""

from __future__ import annotations

import http.client
import json
import re
from urllib.parse import urlsplit

import pytest

import database_config
from redaction import REDACTED
from tests.support.gunicorn import GunicornProcess

pytestmark = pytest.mark.gunicorn

API_KEY = "access-log-test-key-0123456789"
CARD_PATHS = (
    "/v1/payments/4111%201111%201111%201111",
    "/v1/payments/4111+1111+1111+1111",
)
# The card's digits with anything but digits between its groups: any encoding of it.
ANY_FORM_OF_THE_CARD = re.compile(r"4111\D{0,12}1111\D{0,12}1111\D{0,12}1111")


@pytest.fixture
def database(tmp_path):
    url = f"sqlite:///{tmp_path / 'payments.db'}"
    database_config.run_migrations(url)
    return url


def get(url: str, path: str) -> int:
    """Send ``path`` exactly as written (no client-side re-encoding); return the status."""
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    try:
        connection.request("GET", path, headers={"Authorization": f"Bearer {API_KEY}"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_card_number_in_the_request_line_is_redacted_in_the_access_log(sandbox, database):
    env = {
        "DATABASE_URL": database,
        "PAYMENT_API_URL": sandbox.url,
        "API_KEYS": API_KEY,
        "GUNICORN_WORKERS": "1",
        "GUNICORN_THREADS": "2",
    }
    with GunicornProcess(env) as server:
        statuses = [get(server.url, path) for path in CARD_PATHS]
    stderr = server.stderr

    assert statuses == [404, 404]
    assert ANY_FORM_OF_THE_CARD.search(stderr) is None
    assert "4111111111111111" not in stderr
    entries = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    access = [e["message"] for e in entries if e["logger"] == "gunicorn.access"]
    redacted_lines = [m for m in access if f'"GET /v1/payments/{REDACTED} HTTP/1.1" 404' in m]
    assert len(redacted_lines) == len(CARD_PATHS)
