"""A bounded soak: a steady payment rate against the real service, watched for leaks.

    python -m tests.faults.soak --duration 300 --rate 50 --latency-ms 20

Starts the sandbox (answering every charge after ``--latency-ms``), a fresh PostgreSQL
database and gunicorn with the production defaults (2 workers x 8 threads unless told
otherwise), then offers ``--rate`` payments a second on a fixed schedule (open loop: a
slow answer does not slow the offered load; each payment on a new connection, as a
load balancer's would be). Every ``--sample-every`` seconds it records each worker's
resident memory (``VmRSS``) and open file descriptors (``/proc/<pid>/fd``) and the
service's PostgreSQL sessions (``pg_stat_activity``).

After the warm-up a leak-free service is *flat*: each worker's RSS ends within
``RSS_TOLERANCE`` of its baseline; the database sessions stay within what the pools may
hold (``workers x (DB_POOL_SIZE + DB_MAX_OVERFLOW)``: a pool grows to its size under
bursts and keeps its connections, which is not a leak); and the workers' fds, less
one socket per database session, do not grow. The verdict and the samples are printed
as Markdown (``docs/RELIABILITY.md`` keeps a run); the exit status is 1 when a payment
failed or a resource grew.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tests.faults.harness import (
    PROVIDER_KEY,
    assert_books_balance,
    new_key,
    running_service,
    service_backends,
)
from tests.support.sandbox import SandboxProcess

#: The documented defaults, instead of the fault suite's small timeouts.
PRODUCTION_SETTINGS = {
    "PAYMENT_CONNECT_TIMEOUT": "3.05",
    "PAYMENT_READ_TIMEOUT": "5",
    "PAYMENT_DEADLINE": "15",
    "PAYMENT_MAX_RETRIES": "3",
    "PAYMENT_BACKOFF_FACTOR": "0.25",
    "PAYMENT_BREAKER_FAILURES": "5",
    "DB_POOL_TIMEOUT": "5",
}
DB_MAX_OVERFLOW = 5
RSS_TOLERANCE = 0.10  # a worker's RSS may end 10% above its post-warm-up sample
FD_TOLERANCE = 2
CLIENT_THREADS = 64


@dataclass
class Sample:
    at: float  # seconds since the load started
    rss_kib: dict[int, int]  # worker pid -> VmRSS
    fds: dict[int, int]  # worker pid -> open file descriptors
    db_sessions: int
    sent: int


@dataclass
class SoakReport:
    duration: float
    rate: float
    workers: int
    threads: int
    warmup: float
    samples: list[Sample] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    late: int = 0  # payments sent more than a second behind schedule
    elapsed: float = 0.0
    books: dict | None = None

    @property
    def settled(self) -> list[Sample]:
        """Samples after the warm-up (the first one is the baseline)."""
        return [s for s in self.samples if s.at >= self.warmup] or self.samples[-1:]

    def rss_growth(self) -> dict[int, float]:
        """Per worker: relative RSS change from the baseline to the last sample."""
        first, last = self.settled[0], self.settled[-1]
        return {
            pid: last.rss_kib[pid] / first.rss_kib[pid] - 1
            for pid in first.rss_kib
            if pid in last.rss_kib
        }

    def fd_growth(self) -> dict[int, int]:
        first, last = self.settled[0], self.settled[-1]
        return {pid: last.fds[pid] - first.fds[pid] for pid in first.fds if pid in last.fds}

    def session_range(self) -> tuple[int, int]:
        sessions = [s.db_sessions for s in self.settled]
        return min(sessions), max(sessions)

    @property
    def session_limit(self) -> int:
        return self.workers * (self.threads + DB_MAX_OVERFLOW)

    def unexplained_fd_growth(self) -> int:
        """Growth of all workers' fds that is not a database session opened meanwhile."""
        first, last = self.settled[0], self.settled[-1]

        def other_fds(s: Sample) -> int:
            return sum(s.fds.values()) - s.db_sessions

        return other_fds(last) - other_fds(first)

    def problems(self) -> list[str]:
        """Why this run is not clean (empty: clean)."""
        found = []
        failed = {status: n for status, n in self.statuses.items() if status != 201}
        if failed:
            found.append(f"payments not 201: {failed}")
        grown = {pid: g for pid, g in self.rss_growth().items() if g > RSS_TOLERANCE}
        if grown:
            found.append(f"RSS grew beyond {RSS_TOLERANCE:.0%}: {grown}")
        if self.unexplained_fd_growth() > FD_TOLERANCE:
            found.append(f"file descriptors grew by {self.unexplained_fd_growth()}")
        if max(s.db_sessions for s in self.samples) > self.session_limit:
            found.append(f"more database sessions than the pools allow ({self.session_limit})")
        return found

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0

    def to_markdown(self) -> str:
        sent = sum(self.statuses.values())
        lines = [
            f"{sent} payments in {self.elapsed:.0f} s ({sent / self.elapsed:.1f}/s offered at "
            f"{self.rate:g}/s; {self.late} sent over 1 s late), {self.workers} workers x "
            f"{self.threads} threads; answers {dict(self.statuses)}; latency p50 "
            f"{self.percentile(0.5) * 1000:.0f} ms, p99 {self.percentile(0.99) * 1000:.0f} ms, "
            f"max {max(self.latencies, default=0) * 1000:.0f} ms.",
            "",
            "| t (s) | payments sent | RSS per worker (MiB) | open fds per worker "
            "| PostgreSQL sessions |",
            "|---|---|---|---|---|",
        ]
        for s in self.samples:
            rss = ", ".join(f"{kib / 1024:.1f}" for _, kib in sorted(s.rss_kib.items()))
            fds = ", ".join(str(n) for _, n in sorted(s.fds.items()))
            lines.append(f"| {s.at:.0f} | {s.sent} | {rss} | {fds} | {s.db_sessions} |")
        growth = ", ".join(f"{g:+.1%}" for _, g in sorted(self.rss_growth().items()))
        fds = ", ".join(f"{d:+d}" for _, d in sorted(self.fd_growth().items()))
        low, high = self.session_range()
        lines += [
            "",
            f"After the {self.warmup:.0f} s warm-up: RSS {growth}; fds {fds} "
            f"({self.unexplained_fd_growth():+d} not explained by new database sessions); "
            f"PostgreSQL sessions {low}-{high} (the pools allow {self.session_limit}). "
            + ("Verdict: flat." if not self.problems() else f"Verdict: {self.problems()}"),
        ]
        return "\n".join(lines)


def proc_status_kib(pid: int, field_name: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise LookupError(f"{field_name} not in /proc/{pid}/status")


def sample(service, started: float, sent: int) -> Sample:
    rss, fds = {}, {}
    for pid in service.worker_pids():
        try:
            rss[pid] = proc_status_kib(pid)
            fds[pid] = len(os.listdir(f"/proc/{pid}/fd"))
        except (FileNotFoundError, ProcessLookupError):
            continue  # a worker that was replaced
    sessions = len(service_backends(service.database_url))
    return Sample(time.monotonic() - started, rss, fds, sessions, sent)


def run_soak(
    duration: float = 300,
    rate: float = 50,
    latency_ms: float = 20,
    sample_every: float = 10,
    workers: int = 2,
    threads: int = 8,
    warmup: float | None = None,
    progress=None,
) -> SoakReport:
    """Run one soak and return its report (the processes are gone when it returns)."""
    warmup = min(60.0, duration / 5) if warmup is None else warmup
    report = SoakReport(duration, rate, workers, threads, warmup)
    env = {
        **PRODUCTION_SETTINGS,
        "GUNICORN_WORKERS": workers,
        "GUNICORN_THREADS": threads,
        "DB_POOL_SIZE": threads,
        "DB_MAX_OVERFLOW": DB_MAX_OVERFLOW,
    }
    with (
        SandboxProcess(api_key=PROVIDER_KEY, extra_args=("--latency-ms", str(latency_ms))) as sb,
        running_service(sb, **env) as service,
    ):
        lock = threading.Lock()

        def pay() -> None:
            begun = time.monotonic()
            try:
                status = service.pay(new_key("soak"), "12.34", timeout=60).status_code
            except Exception as exc:  # counted, not raised: the soak goes on
                status = type(exc).__name__
            with lock:
                report.statuses[status] += 1
                report.latencies.append(time.monotonic() - begun)

        total = int(duration * rate)
        dispatched = [0]
        stop = threading.Event()
        started = time.monotonic()

        def sampler() -> None:
            while True:
                report.samples.append(sample(service, started, dispatched[0]))
                if progress:
                    progress(report.samples[-1])
                if stop.wait(sample_every):
                    return

        watcher = threading.Thread(target=sampler, name="soak-sampler")
        watcher.start()
        try:
            with ThreadPoolExecutor(CLIENT_THREADS) as pool:
                for index in range(total):
                    lag = time.monotonic() - (started + index / rate)
                    if lag < 0:
                        time.sleep(-lag)
                    elif lag > 1:
                        report.late += 1
                    pool.submit(pay)
                    dispatched[0] = index + 1
        finally:
            stop.set()
            watcher.join()
        report.elapsed = time.monotonic() - started
        report.samples.append(sample(service, started, total))
        report.books = assert_books_balance(service.database_url, sb)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.soak", description=__doc__)
    parser.add_argument("--duration", type=float, default=300, help="seconds of load")
    parser.add_argument("--rate", type=float, default=50, help="payments per second")
    parser.add_argument("--latency-ms", type=float, default=20, help="sandbox latency")
    parser.add_argument("--sample-every", type=float, default=10, help="seconds")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--warmup", type=float, help="seconds before the baseline sample")
    args = parser.parse_args(argv)

    def progress(s: Sample) -> None:
        line = f"t={s.at:.0f}s sent={s.sent} rss={s.rss_kib} fds={s.fds} db={s.db_sessions}"
        print(line, file=sys.stderr, flush=True)

    report = run_soak(
        args.duration,
        args.rate,
        args.latency_ms,
        args.sample_every,
        args.workers,
        args.threads,
        args.warmup,
        progress,
    )
    print(report.to_markdown())
    return 1 if report.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
