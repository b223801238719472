"""The API contract checked from outside: schemathesis against the running service.

``st run`` reads ``/openapi.json`` from a real gunicorn (the sandbox provider, a fresh
PostgreSQL database) and runs every phase - examples, coverage, fuzzing and the stateful
one that follows the document's links (POST, then GET the payment) - with every check.
Nothing is selected or excluded here: whatever operations the document has are covered.

Schemathesis holds the document to its word both ways: what the schema allows must be
accepted, what it forbids must be refused. So the payment request states the money rules
exactly - per currency, how many decimals and how large - as one alternative per group of
currencies. Those alternatives are generated from ``money.CURRENCIES`` and the settings'
defaults by :func:`payment_request_schemas`, and a test keeps the document equal to them;
after changing a currency or a default, rewrite the document with
``python -m tests.integration.test_api_contract``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

import database_config
import money
from settings import Settings
from tests.support.gunicorn import GunicornProcess
from tests.support.postgres import temporary_database

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "service" / "openapi.json"
API_KEY = "contract-test-key-0123456789abcdef"
WEBHOOK_SECRET = "whsec_Y29udHJhY3QtdGVzdC13ZWJob29rLXNlY3JldA=="
#: Enough cases per operation and phase for the run to find what the issue found, while
#: the whole run stays within about a minute on two cores. A fixed seed makes a failure
#: reproducible (``st run ... --seed``); change it to explore further.
MAX_EXAMPLES = 40
SEED = 20260614
RUN_TIMEOUT_S = 240
PHASES = ("examples", "coverage", "fuzzing", "stateful")
#: One statement no schema can make: whether a refund is more than what is left depends
#: on the refunds made before it (the stateful phase refunds the payments it made). That
#: is documented as 422 (DESIGN.md section 6), so it is expected of valid refund
#: requests, for that operation only; every other check and status stays as it is.
CONFIGURATION = """
[[operations]]
include-operation-id = "createRefund"
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx",
]
"""

# --------------------------------------------------------------------------- the document

#: Characters ``str.strip`` removes, spelled out: regex ``\s`` differs between engines.
WHITESPACE = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
#: Text the service takes for free-form fields: not only whitespace, and no NUL.
NON_BLANK_TEXT = "^[^\\u0000]*[^\\u0000{}][^\\u0000]*$".format(
    "".join(f"\\u{ord(c):04x}" for c in WHITESPACE)
)
#: Keys travel as HTTP headers to the provider: printable ASCII, not only spaces.
KEY_TEXT = "^[ -~]*[!-~][ -~]*$"
SHARED_FIELDS = {
    "payment_method": {"$ref": "#/components/schemas/PaymentMethod"},
    "transaction_id": {"$ref": "#/components/schemas/TransactionId"},
    "description": {"$ref": "#/components/schemas/Description"},
    "metadata": {"$ref": "#/components/schemas/Metadata"},
}


def _integers_below(limit: str) -> list[str]:
    """Regex alternatives for the integers 1 .. ``limit`` - 1, without leading zeros."""
    width = len(limit)
    alternatives = []
    if width == 2:
        alternatives.append("[1-9]")
    elif width > 2:
        alternatives.append(f"[1-9][0-9]{{0,{width - 2}}}")
    for position, digit in enumerate(limit):
        low, high = (1 if position == 0 else 0), int(digit) - 1
        if high < low:
            continue
        rest = width - position - 1
        digits = str(low) if high == low else f"[{low}-{high}]"
        tail = "" if rest == 0 else "[0-9]" if rest == 1 else f"[0-9]{{{rest}}}"
        alternatives.append(limit[:position] + digits + tail)
    return alternatives


def amount_pattern(ceiling: int, exponent: int) -> str:
    """Plain decimal text for an amount in (0, ``ceiling``] with at most ``exponent``
    significant decimals (trailing zeros and leading zeros are fine, as in the service)."""
    any_fraction = rf"(?:\.[0-9]{{1,{exponent}}}0*)?" if exponent else r"(?:\.0+)?"
    below = "|".join(_integers_below(str(ceiling)))
    alternatives = [f"0*(?:{below}){any_fraction}", rf"0*{ceiling}(?:\.0+)?"]
    if exponent:
        first_nonzero = (
            "0" * zeros
            + "[1-9]"
            + (f"[0-9]{{0,{exponent - 1 - zeros}}}" if zeros < exponent - 1 else "")
            for zeros in range(exponent)
        )
        alternatives.append(rf"0+\.(?:{'|'.join(first_nonzero)})0*")
    return f"^(?:{'|'.join(alternatives)})$"


def amount_schema(currency: str, config: Settings) -> dict:
    exponent = money.currency_exponent(currency)
    ceiling = money.to_major_units(
        money.max_minor_units(currency, config.payment_max_amount), currency
    )
    if ceiling != int(ceiling):  # the rounded rates keep the default ceilings whole
        raise ValueError(f"{currency}: ceiling {ceiling} is not a whole number")
    return {
        "oneOf": [
            {"type": "string", "maxLength": 64, "pattern": amount_pattern(int(ceiling), exponent)},
            {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": int(ceiling),
                "multipleOf": 1 if exponent == 0 else float(f"1e-{exponent}"),
            },
        ]
    }


def _any_case(code: str) -> str:
    return "".join(f"[{letter.upper()}{letter.lower()}]" for letter in code)


def payment_request_schemas(config: Settings | None = None) -> list[dict]:
    """One object schema for a request without a currency (``PAYMENT_CURRENCY``), then one
    per group of currencies sharing decimals and ceiling, for ``config`` (the defaults)."""
    config = config or Settings()
    schemas = [
        {
            "title": f"Without a currency: PAYMENT_CURRENCY ({config.payment_currency})",
            "type": "object",
            "additionalProperties": False,
            "required": ["amount"],
            "properties": {
                "amount": amount_schema(config.payment_currency, config),
                "currency": {"type": "null"},
                **SHARED_FIELDS,
            },
        }
    ]
    groups: dict[str, list[str]] = {}
    for code in money.CURRENCIES:
        groups.setdefault(json.dumps(amount_schema(code, config)), []).append(code)
    for rule, codes in groups.items():
        schemas.append(
            {
                "title": ", ".join(codes),
                "type": "object",
                "additionalProperties": False,
                "required": ["amount", "currency"],
                "properties": {
                    "amount": json.loads(rule),
                    "currency": {
                        "type": "string",
                        "pattern": f"^(?:{'|'.join(_any_case(code) for code in codes)})$",
                    },
                    **SHARED_FIELDS,
                },
            }
        )
    return schemas


def expected_document(document: dict) -> dict:
    """``document`` with the generated parts of the payment request in place."""
    rebuilt = json.loads(json.dumps(document))
    schemas = rebuilt["components"]["schemas"]
    schemas["PaymentRequest"]["oneOf"] = payment_request_schemas()
    for name in ("PaymentMethod", "Description"):
        schemas[name]["pattern"] = NON_BLANK_TEXT
    schemas["TransactionId"]["pattern"] = KEY_TEXT
    for parameter in rebuilt["paths"]["/v1/payments"]["post"]["parameters"]:
        if parameter.get("name") == "Idempotency-Key":
            parameter["schema"]["pattern"] = KEY_TEXT
    return rebuilt


def render(document: dict) -> str:
    return json.dumps(document, indent=2) + "\n"


def test_the_document_states_the_money_rules_of_the_code():
    """Regenerate with ``python -m tests.integration.test_api_contract`` when this fails."""
    document = json.loads(DOCUMENT.read_text())
    assert document == expected_document(document)


@pytest.mark.parametrize(
    ("text", "currency", "accepted"),
    [
        ("0.01", "USD", True),
        ("1000000", "USD", True),
        ("1000000.000", "USD", True),
        ("1000000.01", "USD", False),
        ("0", "USD", False),
        ("0.001", "USD", False),
        ("007.50", "EUR", True),
        ("900000.01", "EUR", False),
        ("899999.99", "EUR", True),
        ("5", "JPY", True),
        ("5.0", "JPY", True),
        ("5.5", "JPY", False),
        ("150000000", "JPY", True),
        ("150000001", "JPY", False),
        ("0.001", "KWD", True),
        ("1.0001", "KWD", False),
        ("86\n", "USD", False),
        (" 86", "USD", False),
        ("86\f \n", "USD", False),
    ],
)
def test_the_amount_patterns_agree_with_the_service(text, currency, accepted):
    config = Settings()
    pattern = re.compile(amount_schema(currency, config)["oneOf"][0]["pattern"])
    assert (pattern.fullmatch(text) is not None) == accepted
    try:
        money.to_minor_units(text, currency, max_usd=config.payment_max_amount)
    except money.InvalidPaymentRequest:
        assert not accepted
    else:
        assert accepted


# --------------------------------------------------------------------------- the run


class IdempotencyKeys:
    """The keys the service has seen: a request reusing one for another request gets a
    fresh key, as a client following the contract would.

    A key names one request: the service replays it for the same request and refuses it
    (422 ``idempotency_key_reused``) for another, as documented. Generated data repeats
    small values ("0", "a") across unrelated cases, and the stateful phase copies a
    payment's ``transaction_id`` into new requests, so without this a schema-valid request
    would be refused for what an earlier case sent. A request's key is its Idempotency-Key
    header, else its body's ``transaction_id`` (the document's rule); keys are learnt from
    requests and from the ``idempotency_key``/``transaction_id`` of answers (the service
    makes one up when neither is sent). Only a colliding key is replaced, by random hex of
    its length, so every other value goes out as drawn, and schemathesis re-validates the
    case after ``before_call``, so its checks judge what was sent.
    """

    TAKEN = object()  # a key seen in an answer: which request it belongs to is not known

    def __init__(self) -> None:
        self._first_request: dict[str, object] = {}
        self._lock = threading.Lock()

    def before_call(self, context, case, kwargs) -> None:
        if case.meta is not None and case.meta.generation.mode.is_negative:
            # Refused anyway; and a changed case is re-validated, which would turn a case
            # left without its Authorization header on purpose into one that has it.
            return
        headers = dict(case.headers or {})
        header = next((name for name in headers if name.lower() == "idempotency-key"), None)
        body = case.body if isinstance(case.body, dict) else {}
        if header is not None:
            key = headers[header].strip(" \t") if isinstance(headers[header], str) else None
        else:
            key = (
                body.get("transaction_id") if isinstance(body.get("transaction_id"), str) else None
            )
        if key is None:
            return
        with self._lock:
            if self._first_request.setdefault(key, self._request(case)) == self._request(case):
                return
            fresh = key
            while fresh in self._first_request:
                fresh = secrets.token_hex(128)[: len(key) if len(key) > 6 else 32]
            if header is not None:
                case.headers[header] = fresh  # in place: what schemathesis left out stays out
            else:
                case.body = {**body, "transaction_id": fresh}
            self._first_request[fresh] = self._request(case)

    def after_call(self, context, case, response) -> None:
        try:
            answer = response.json()
        except ValueError:
            return
        if isinstance(answer, dict):
            with self._lock:
                for field in ("idempotency_key", "transaction_id"):
                    if isinstance(answer.get(field), str):
                        self._first_request.setdefault(answer[field], self.TAKEN)

    @staticmethod
    def _request(case) -> str:
        return json.dumps(
            [case.method, case.path_parameters, case.body], sort_keys=True, default=str
        )


def sign_webhook(case) -> None:
    """Sign a webhook delivery as the provider would (``webhookSignature`` in the
    document): schemathesis cannot make a signature, and without one every delivery is
    rightly refused. A drawn signature is replaced by a real one over the body exactly as
    requests will send it (``json=``: ``json.dumps`` with its defaults), left as drawn."""
    headers = case.headers or {}
    if not case.path.startswith("/v1/webhooks/") or not any(
        name.lower() == "webhook-signature" for name in headers
    ):
        return  # a case left without a signature on purpose must stay without one
    try:
        body = "null" if case.body is None else json.dumps(case.body, allow_nan=False)
    except (TypeError, ValueError):  # not JSON at all: the unsigned request is refused
        return
    event_id = _event_id(case.body) or f"evt_{secrets.token_hex(8)}"
    at = datetime.now(UTC)
    case.headers = {
        **{name: value for name, value in headers.items() if name.lower() != "webhook-signature"},
        "webhook-id": event_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(WEBHOOK_SECRET).sign(event_id, at, body),
    }


def _event_id(body) -> str | None:
    event_id = body.get("id") if isinstance(body, dict) else None
    return event_id if isinstance(event_id, str) and event_id.isascii() and event_id else None


if __name__ == "_schemathesis_hooks":  # loaded by ``st run`` through SCHEMATHESIS_HOOKS
    import schemathesis

    _keys = IdempotencyKeys()

    @schemathesis.hook
    def before_call(context, case, kwargs) -> None:
        _keys.before_call(context, case, kwargs)
        sign_webhook(case)

    @schemathesis.hook
    def after_call(context, case, response) -> None:
        _keys.after_call(context, case, response)


@pytest.fixture
def service(sandbox) -> Iterator[GunicornProcess]:
    """The service under gunicorn on a fresh, migrated PostgreSQL database."""
    with temporary_database() as url:
        database_config.run_migrations(url)
        env = {
            "DATABASE_URL": url,
            "PAYMENT_API_URL": sandbox.url,
            "API_KEYS": API_KEY,
            "PAYMENT_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "GUNICORN_WORKERS": "1",
            "GUNICORN_THREADS": "4",
        }
        with GunicornProcess(env) as gunicorn:
            yield gunicorn


@pytest.mark.slow
@pytest.mark.gunicorn
@pytest.mark.postgres
def test_schemathesis_finds_nothing_in_any_phase(service, tmp_path):
    report = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{service.url}/openapi.json",
        "--phases", ",".join(PHASES),
        "--checks", "all",
        "--header", f"Authorization: Bearer {API_KEY}",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", str(SEED),
        "--workers", "1",
        "--request-timeout", "30",
        "--generation-database", "none",
        "--report", "json", "--report-json-path", str(report),
        "--no-color",
    ]  # fmt: skip
    # cwd: a directory with only this configuration, so only these options apply
    (tmp_path / "schemathesis.toml").write_text(CONFIGURATION)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SCHEMATHESIS_HOOKS": __file__}
    completed = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    output = completed.stdout[-15000:] + completed.stderr[-3000:]
    assert completed.returncode == 0, output
    result = json.loads(report.read_text())
    operations = result["operations"]
    assert operations["tested"] == operations["total"] > 0, output
    assert not operations["errored"] and not operations["skipped"], output
    assert {phase: result["phases"][phase]["status"] for phase in PHASES} == dict.fromkeys(
        PHASES, "success"
    ), output
    assert not result["failures"] and not result["errors"], output
    assert not any(result["warnings"].values()), output


if __name__ == "__main__":  # rewrite the generated parts of the document
    DOCUMENT.write_text(render(expected_document(json.loads(DOCUMENT.read_text()))))
