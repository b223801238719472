"""The soak of ``tests/faults/soak.py``, 20 seconds long: every payment succeeds and no
worker's memory, file descriptors or database sessions grow once warmed up.

The five-minute run (``python -m tests.faults.soak``) is reported in docs/RELIABILITY.md.
"""

from __future__ import annotations

import pytest

from tests.faults.soak import run_soak

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn, pytest.mark.postgres, pytest.mark.slow]


def test_twenty_second_soak_is_flat():
    report = run_soak(
        duration=20, rate=25, latency_ms=20, sample_every=2, workers=2, threads=4, warmup=6
    )
    assert report.statuses == {201: 500}
    assert report.books == {"USD": 1234 * 500}
    assert not report.problems(), report.to_markdown()
    low, high = report.session_range()
    assert 1 <= low <= high <= report.session_limit == 2 * (4 + 5)
    assert len(report.settled) >= 5
