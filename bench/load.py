"""The load: wrk with ``bench/payments.lua`` in its own process, and a ``/healthz`` prober.

wrk drives a fixed number of keep-alive connections (closed loop) for a fixed time;
the Lua script gives every request a unique Idempotency-Key and records each answer's
status, send time and latency, parsed here into a :class:`LoadResult`. Given a file of
payment ids, the same script sends a partial refund of each instead, and the run ends
early once every one of them has had an answer. The prober is
open loop: it starts a fresh-connection ``GET /healthz`` every 50 ms whatever the
earlier ones are doing, so a stuck server shows up as long latencies, not fewer samples.
"""

from __future__ import annotations

import http.client
import math
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

LUA_SCRIPT = Path(__file__).resolve().with_name("payments.lua")
#: An answer slower than this counts as a client timeout (the client gave up).
CLIENT_TIMEOUT_S = 30.0
PROBE_INTERVAL_S = 0.05
PROBE_TIMEOUT_S = 10.0
MAX_PROBES_IN_FLIGHT = 256
#: How often the driver looks whether a refund run has had an answer for every payment.
DONE_POLL_S = 0.05


def ensure_wrk() -> str:
    """The wrk binary; installed with apt-get when missing (as root), else a clear error."""
    path = shutil.which("wrk")
    if path:
        return path
    print("wrk is not installed: apt-get install -y wrk", file=sys.stderr, flush=True)
    try:
        subprocess.run(["apt-get", "update"], check=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SystemExit(
            f"could not install wrk ({exc}); install it yourself: "
            "sudo apt-get update && sudo apt-get install -y wrk"
        ) from exc
    path = shutil.which("wrk")
    if not path:
        raise SystemExit("wrk is still missing after apt-get install -y wrk")
    return path


@dataclass
class Answer:
    """One response: when its request was sent (epoch s), its latency (s), its status."""

    sent: float
    latency: float
    status: int

    @property
    def done(self) -> float:
        return self.sent + self.latency


@dataclass
class LoadResult:
    """What one wrk run saw."""

    started: float
    ended: float
    answers: list[Answer]
    sent_per_second: dict[int, int]
    summary: dict[str, int]
    wrk_output: str
    unanswered: int = 0
    statuses: Counter = field(default_factory=Counter)
    #: A refund run that ran out of payments before its time: ``ended`` is then the
    #: last answer, not when wrk exited.
    stopped_early: bool = False

    def __post_init__(self) -> None:
        self.statuses = Counter(a.status for a in self.answers)
        answered = self.answered_per_second()
        self.unanswered = sum(max(0, n - answered[s]) for s, n in self.sent_per_second.items())

    @property
    def duration(self) -> float:
        return self.ended - self.started

    def window(self, start: float) -> LoadResult:
        """The requests sent from ``start`` (epoch s) on."""
        return LoadResult(
            start,
            self.ended,
            [a for a in self.answers if a.sent >= start],
            {s: n for s, n in self.sent_per_second.items() if s >= start},
            self.summary,
            self.wrk_output,
            stopped_early=self.stopped_early,
        )

    def answered_per_second(self) -> Counter:
        return Counter(int(a.sent) for a in self.answers)

    def count(self, status: int) -> int:
        return self.statuses[status]

    def latencies(self) -> list[float]:
        return sorted(a.latency for a in self.answers)

    def lost(self) -> dict[int, int]:
        """Requests never answered, by the second they were sent, if sent long enough
        before the end that the client would have given up on them."""
        answered = self.answered_per_second()
        return {
            s: n - answered[s]
            for s, n in self.sent_per_second.items()
            if n > answered[s] and s + 1 + CLIENT_TIMEOUT_S <= self.ended
        }

    def timeouts(self) -> int:
        """Answers slower than the client timeout, and requests never answered by then."""
        late = sum(a.latency > CLIENT_TIMEOUT_S for a in self.answers)
        return late + sum(self.lost().values())


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def run_wrk(
    url: str,
    *,
    connections: int,
    duration: float,
    api_key: str,
    run_id: str,
    records_path: Path,
    threads: int = 1,
    think_ms: float = 0,
    refund_ids: Path | None = None,
    refund_amount: str = "5.00",
) -> LoadResult:
    """Run wrk against ``url`` for ``duration`` seconds and parse its records.

    ``think_ms`` > 0 paces each connection (a mean think time before each request).
    ``refund_ids`` (a file of payment ids, one a line) makes every request a refund of
    ``refund_amount`` of the next of those payments, each once; once every one of them
    has had an answer wrk is stopped (SIGINT: it still writes its records), and the
    result ends at the last answer.
    """
    wrk = ensure_wrk()
    records_path.parent.mkdir(parents=True, exist_ok=True)
    records_path.unlink(missing_ok=True)
    command = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={int(CLIENT_TIMEOUT_S)}s",
        "--latency",
        "-s",
        str(LUA_SCRIPT),
        url,
    ]
    env = {
        "BENCH_RUN_ID": run_id,
        "BENCH_API_KEY": api_key,
        "BENCH_RECORDS": str(records_path),
        "BENCH_THINK_MS": str(think_ms),
    }
    done_path = None
    if refund_ids is not None:
        done_path = records_path.with_name(records_path.name + ".done")
        done_path.unlink(missing_ok=True)
        env.update(
            BENCH_REFUND_IDS=str(refund_ids),
            BENCH_REFUND_AMOUNT=refund_amount,
            BENCH_THREADS=str(threads),
            BENCH_DONE=str(done_path),
        )
    started = time.time()
    stdout, stderr, returncode, stopped_early = _run(
        command, env, duration + 60, done_path, threads
    )
    ended = time.time()
    if returncode != 0 or not records_path.exists():
        raise RuntimeError(f"wrk failed ({returncode}): {stderr[-2000:]}")
    result = parse_records(records_path.read_text(), started, ended, stdout)
    if stopped_early and result.answers:
        result.ended = max(a.done for a in result.answers)
        result.stopped_early = True
    return result


def _run(
    command: list[str], env: dict, timeout: float, done_path: Path | None, threads: int
) -> tuple[str, str, int, bool]:
    """Run wrk to its end, or, with ``done_path``, until all ``threads`` wrote their
    number there; then SIGINT it (wrk's own way to stop early, and it writes its
    records). ``(stdout, stderr, returncode, stopped early)``."""
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + timeout
    stopped_early = False
    while True:
        wait = max(0.0, deadline - time.monotonic())
        try:
            stdout, stderr = process.communicate(
                timeout=min(wait, DONE_POLL_S) if done_path and not stopped_early else wait
            )
            return stdout, stderr, process.returncode, stopped_early
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                process.kill()
                process.communicate()
                raise RuntimeError(f"wrk did not finish within {timeout:.0f} s") from None
            if not stopped_early and _all_done(done_path, threads):
                process.send_signal(signal.SIGINT)
                stopped_early = True


def _all_done(done_path: Path | None, threads: int) -> bool:
    """Every wrk thread wrote its number into ``done_path``."""
    return (
        done_path is not None
        and done_path.exists()
        and (len(done_path.read_text().split()) >= threads)
    )


def parse_records(text: str, started: float, ended: float, wrk_output: str = "") -> LoadResult:
    """Parse the lines ``payments.lua`` writes (see its header)."""
    answers, sent, summary = [], Counter(), Counter()
    for line in text.splitlines():
        kind, *values = line.split()
        if kind == "r":
            answers.append(Answer(float(values[0]), int(values[1]) / 1e6, int(values[2])))
        elif kind == "s":
            sent[int(values[0])] += int(values[1])
        elif kind == "summary":
            summary[values[0]] += int(values[1])
    answers.sort(key=lambda a: a.sent)
    return LoadResult(started, ended, answers, dict(sent), dict(summary), wrk_output)


@dataclass
class Probe:
    started: float
    latency: float | None  # None: no answer within PROBE_TIMEOUT_S, or the connection failed
    status: int | None


class HealthProber:
    """Starts ``GET /healthz`` on a fresh connection every ``interval`` until stopped.

    Bounded: at most ``max_seconds`` of probing, ``MAX_PROBES_IN_FLIGHT`` at once.
    """

    def __init__(self, url: str, *, interval: float = PROBE_INTERVAL_S, max_seconds=600.0):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.interval = interval
        self.max_seconds = max_seconds
        self.probes: list[Probe] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(MAX_PROBES_IN_FLIGHT, thread_name_prefix="probe")
        self._ticker = threading.Thread(target=self._tick, name="prober", daemon=True)

    def __enter__(self) -> HealthProber:
        self._ticker.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._ticker.join(10)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _tick(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        next_at = time.monotonic()
        while not self._stop.is_set() and time.monotonic() < deadline:
            self._pool.submit(self._probe)
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _probe(self) -> None:
        started, t0 = time.time(), time.perf_counter()
        connection = http.client.HTTPConnection(self.host, self.port, timeout=PROBE_TIMEOUT_S)
        try:
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            response.read()
            probe = Probe(started, time.perf_counter() - t0, response.status)
        except (OSError, http.client.HTTPException):
            probe = Probe(started, None, None)
        finally:
            connection.close()
        with self._lock:
            self.probes.append(probe)

    def probes_since(self, start: float, end: float = math.inf) -> list[Probe]:
        """Probes started in ``[start, end)``, in order."""
        with self._lock:
            return sorted(
                (p for p in self.probes if start <= p.started < end), key=lambda p: p.started
            )

    def latencies(self, start: float = 0.0, end: float = math.inf) -> list[float]:
        """Sorted latencies of probes started in ``[start, end)``; a failed one counts as
        ``PROBE_TIMEOUT_S``."""
        probes = self.probes_since(start, end)
        return sorted(PROBE_TIMEOUT_S if p.latency is None else p.latency for p in probes)

    def failures(self, start: float = 0.0) -> int:
        return sum(p.latency is None or p.status != 200 for p in self.probes_since(start))
