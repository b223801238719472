"""The benchmark driver works end to end, and its record parsing counts what it should.

The smoke run is a few seconds of the steady scenario for the service and the naive
app (real gunicorn, PostgreSQL, TLS sandbox and wrk): it proves the harness runs and
reports, never how fast anything is.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.load import CLIENT_TIMEOUT_S, parse_records
from bench.procs import ROOT

SMOKE_TIMEOUT_S = 240


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
