"""Recycled gunicorn workers leave no metric files behind and no requests uncounted.

gunicorn recycles a worker after ``--max-requests``; the master then folds the dead
worker's counter and histogram files into the archives (``metrics_archive``). With a
tiny ``--max-requests`` the workers recycle many times in a few seconds.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.support.gunicorn import GunicornProcess

pytestmark = [pytest.mark.gunicorn, pytest.mark.postgres, pytest.mark.slow]

API_KEY = "recycling-test-key-0123456789"
WORKERS = 2
MAX_REQUESTS = 15
BATCH = 10
BATCHES = 12  # 120 requests (plus the scrapes): each worker recycles several times
#: Files of one live worker: counter, histogram, and the livesum and livemax gauges.
FILES_PER_WORKER = 4
ARCHIVES = 2  # counter_archive.db, histogram_archive.db
SCRAPE_TIMEOUT_S = 10.0
ANSWERED = 'http_requests_total{method="GET",route="/openapi.json",status="200"} '


def scrape_answered(url: str) -> float:
    """``ANSWERED`` at /metrics; a scrape that fails is repeated until a deadline.

    A scrape fails when a worker's file is removed between listing the directory and
    reading it (``metrics_archive`` documents why): that is a missing sample, not a
    wrong one.
    """
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while True:
        response = requests.get(url + "/metrics", timeout=5)
        if response.status_code == 200:
            lines = [line for line in response.text.splitlines() if line.startswith(ANSWERED)]
            return sum(float(line.rsplit(" ", 1)[1]) for line in lines)
        assert time.monotonic() < deadline, f"/metrics kept failing: {response.status_code}"
        time.sleep(0.05)


def worker_pids_with_files(directory: Path) -> set[str]:
    return {path.stem.rsplit("_", 1)[1] for path in directory.glob("*_[0-9]*.db")}


def test_recycled_workers_leave_bounded_files_and_exact_request_counts(sandbox, pg_url, tmp_path):
    metrics_dir = tmp_path / "prometheus"
    env = {
        "DATABASE_URL": pg_url,
        "PAYMENT_API_URL": sandbox.url,
        "API_KEYS": API_KEY,
        "GUNICORN_WORKERS": str(WORKERS),
        "GUNICORN_THREADS": "4",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "GUNICORN_CMD_ARGS": f"--max-requests {MAX_REQUESTS} --max-requests-jitter 0",
    }
    answered, counted, files_seen, pids_seen = 0, [], [], set()
    with GunicornProcess(env) as server, ThreadPoolExecutor(4) as pool:
        for _ in range(BATCHES):
            statuses = list(
                pool.map(
                    lambda _: requests.get(server.url + "/openapi.json", timeout=30).status_code,
                    range(BATCH),
                )
            )
            assert statuses == [200] * BATCH
            answered += BATCH
            counted.append((answered, scrape_answered(server.url)))
            files_seen.append(len(list(metrics_dir.glob("*.db"))))
            pids = worker_pids_with_files(metrics_dir)
            assert len(pids) <= WORKERS, f"files of dead workers are left: {sorted(pids)}"
            pids_seen |= pids
    booted = re.findall(r"Booting worker with pid: (\d+)", server.stderr)

    assert counted == [(n, n) for n, _ in counted]  # after every batch, across recycles
    assert max(files_seen) <= WORKERS * FILES_PER_WORKER + ARCHIVES
    assert len(booted) >= WORKERS + 4, f"workers recycled only {len(booted) - WORKERS} times"
    assert len(pids_seen) >= WORKERS + 2
    assert "could not archive" not in server.stderr
