"""The benchmark driver works end to end, and its record parsing counts what it should.

The smoke runs are a few seconds of a scenario (real gunicorn, PostgreSQL, TLS sandbox
and wrk; Redis and a moto server for the production shape; a 2,000-payment table for
the year scenario; one round of payments and their refunds for the refunds scenario):
they prove the harness runs and reports, never how fast anything is.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.load import CLIENT_TIMEOUT_S, parse_records
from bench.procs import ROOT
from bench.scenarios import PRODUCTION_REDIS_URL
from tests.support.redis_breaker import breaker_redis

SMOKE_TIMEOUT_S = 240


def quick_run(out, *args) -> dict:
    """``python -m bench.run --quick ARGS --out OUT``; its ``results.json``."""
    completed = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", *args, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.gunicorn
def test_quick_steady_run_reports_payments_for_both_apps(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--scenarios", "steady"]
        + ["--apps", "service,naive", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "| steady | naive | service |" in completed.stdout
    assert "| payments/s (201) |" in (tmp_path / "results.txt").read_text()
    runs = json.loads((tmp_path / "results.json").read_text())["results"]["steady"]
    for app in ("naive", "service"):
        assert runs[app]["throughput_per_s"] > 0
        assert runs[app]["statuses"].get("201", 0) == runs[app]["payments_201"] > 0
        assert runs[app]["stored_payments"].get("succeeded", 0) >= runs[app]["payments_201"]
    assert (tmp_path / "wrk-steady-service.txt").read_text().startswith("Running")


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.gunicorn
def test_quick_production_shape_ships_every_worker_log_to_cloudwatch(tmp_path):
    with breaker_redis(PRODUCTION_REDIS_URL):  # skips when Redis is down
        document = quick_run(tmp_path, "--scenarios", "steady", "--apps", "service,production")
    runs = document["results"]["steady"]
    production = runs["production"]
    assert production["payments_201"] > 0 and runs["service"]["payments_201"] > 0
    assert production["cloudwatch_streams"] == 2  # one per worker
    assert 0 < production["cloudwatch_events"] <= production["log_lines"]
    assert document["parameters"]["production_env"]["REDIS_URL"] == PRODUCTION_REDIS_URL
    assert "| steady: production / service |" in (tmp_path / "results.txt").read_text()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.gunicorn
def test_quick_year_run_fills_in_sql_explains_the_claim_and_reconciles_the_unknown(tmp_path):
    # Two rounds: the second one loads the same pre-filled database again.
    document = quick_run(
        tmp_path, "--scenarios", "year", "--year-payments", "2000", "--repeat", "2"
    )
    runs = document["results"]["year"]
    for contender in ("empty", "year"):  # every 201 a new payment, none a replay
        assert 0 < runs[contender]["payments_201"] <= runs[contender]["stored_by_run"]
    full = runs["year"]
    assert full["fill"]["rows"]["payments"] == 2000
    assert full["fill"]["statuses"]["unknown"] == 100
    assert full["fill"]["rows"]["payment_events"] == 4000
    assert full["reconcile_report"]["examined"] == 100
    assert full["reconcile_report"]["failed"] == 100  # the sandbox never saw their keys
    # A plan, not which one: on 2,000 rows a sequential scan is a fair choice.
    assert len(full["claim_plans"]) == 2 and "Execution Time" in full["claim_plans"][0]
    assert "claim query, batch 1:" in (tmp_path / "results.txt").read_text()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.gunicorn
def test_quick_refunds_run_refunds_each_payment_of_the_round_once(tmp_path):
    document = quick_run(tmp_path, "--scenarios", "refunds")
    runs = document["results"]["refunds"]
    payments, refunds = runs["payments"], runs["refunds"]
    assert payments["payments_201"] > 0 and refunds["payments_201"] > 0
    assert refunds["statuses"] == {"201": refunds["payments_201"]}  # every refund succeeded
    # The refunds are of the payments the round made, each refunded at most once.
    assert refunds["payments_to_refund"] == payments["stored_payments"]["succeeded"]
    stored = refunds["stored_refunds"]
    assert stored["statuses"] == {"succeeded": refunds["stored_by_run"]}
    assert stored["payments_refunded"] == refunds["stored_by_run"] <= refunds["payments_to_refund"]
    assert refunds["provider_charge_requests"] == 0 < refunds["provider_refund_requests"]
    counts = refunds["statements"]
    assert counts["payment"]["statements"] > 0 and counts["refund"]["statements"] > 0
    text = (tmp_path / "results.txt").read_text()
    assert "| refund / payment | each round |" in text and "refunds: p99 latency" in text


def test_records_count_answers_lost_requests_and_slow_answers_as_timeouts():
    text = "\n".join(
        [
            "summary duration_us 60000000",
            "r 1000.000000 20000 201",
            "r 1000.500000 40000 503",
            f"r 1001.000000 {int((CLIENT_TIMEOUT_S + 1) * 1e6)} 201",
            "s 1000 3",  # one of the three sent in second 1000 was never answered
            "s 1001 1",
            "s 1059 2",  # sent too close to the end to call them timeouts
        ]
    )
    load = parse_records(text, started=999.5, ended=1060.0)
    assert load.count(201) == 2 and load.count(503) == 1
    assert load.unanswered == 3
    assert load.timeouts() == 2  # the lost one from second 1000, the 31 s answer
    assert [a.latency for a in load.window(1000.2).answers] == [0.04, CLIENT_TIMEOUT_S + 1]
