"""The scenarios: each runs its apps one after another under the same load.

Every app run gets a fresh database (the year scenario: its pre-filled one), a freshly
reset sandbox, a warm-up, then the measured load; the figures of one run are a flat
dict (see :func:`measure`). Running the apps of a scenario back to back in one
invocation keeps their ratios meaningful on a small, noisy machine.

The apps: ``floor`` and ``naive`` (yardsticks), ``service`` (the product as the other
scenarios run it) and ``production``: the same service in its production shape, the
circuit breaker shared through Redis (``REDIS_URL``) and every log record also shipped
to CloudWatch Logs (a moto server on loopback stands in for AWS).
"""

from __future__ import annotations

import json
import math
import secrets
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import boto3
import redis

from bench.databases import ActivityPoller, Databases
from bench.load import CLIENT_TIMEOUT_S, HealthProber, LoadResult, percentile, run_wrk
from bench.procs import AppProcess, machine_cpu_seconds, own_cpu_seconds

API_KEY = "bench-inbound-key-0123456789"
POOL_EXHAUSTED = "Database query failed: connection pool exhausted"
BREAKER_OPENED = "circuit breaker opened after"
FAST_503_S = 0.05
STEADY_LATENCY_MS = 20
SLOW_LATENCY_MS = 2000
WORKERS = 2
#: Slow and hanging provider: a paced load of one client per thread, each pausing 0.8 s
#: on average (at most 1.6 s, under gunicorn's 2 s keep-alive) between payments: about
#: 75 payments/s while the provider is healthy, half of what the apps can take, and
#: enough clients to occupy every thread of both workers when it is not.
PACED_CLIENTS = WORKERS * 32
THINK_MS = 800
#: Service settings that bound the hanging-provider scenario (everything else: defaults).
SERVICE_ENV = {"PAYMENT_BREAKER_RESET": "5"}
#: The naive app waits as long as the service for a pooled database connection.
NAIVE_ENV = {"DB_POOL_TIMEOUT": "5"}
#: The production shape's Redis: an index of the bench's own (the breaker's keys are
#: fixed; the tests use indexes 11 and 12).
PRODUCTION_REDIS_URL = "redis://127.0.0.1:6379/13"
BREAKER_KEYS = "payments:breaker:*"
CLOUDWATCH_REGION = "us-east-1"
#: Fake credentials for the moto server (never real ones: nothing leaves loopback).
FAKE_AWS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@dataclass(frozen=True)
class Scenario:
    """How one scenario loads its apps. Durations in seconds."""

    name: str
    apps: tuple[str, ...]
    threads: int
    connections: int
    latency_ms: float
    duration: float
    warmup: float
    think_ms: float = 0  # > 0: a paced load (each connection waits this long on average)
    probe_health: bool = False
    hang_before: float = 0.0  # hanging scenario: healthy lead-in, hang window, then healed
    hang_for: float = 0.0


def scenarios(quick: bool) -> dict[str, Scenario]:
    """The scenarios; ``quick`` shrinks every duration to a few seconds (smoke runs)."""
    scale = 0.2 if quick else 1.0
    warmup = 1.0 if quick else 3.0
    hang_before, hang_for, healed_for = (2.0, 8.0, 6.0) if quick else (5.0, 25.0, 15.0)
    return {
        "steady": Scenario(
            "steady",
            ("floor", "naive", "service", "production"),
            threads=8,
            connections=WORKERS * 8,
            latency_ms=STEADY_LATENCY_MS,
            duration=max(3.0, 15 * scale),
            warmup=warmup,
        ),
        "slow": Scenario(
            "slow",
            ("naive", "service"),
            threads=32,
            connections=PACED_CLIENTS,
            think_ms=THINK_MS,
            latency_ms=SLOW_LATENCY_MS,
            duration=max(4.0, 15 * scale),
            warmup=warmup,
            probe_health=True,
        ),
        "hang": Scenario(
            "hang",
            ("naive", "service"),
            threads=32,
            connections=PACED_CLIENTS,
            think_ms=THINK_MS,
            latency_ms=STEADY_LATENCY_MS,
            duration=hang_before + hang_for + healed_for,
            warmup=warmup,
            probe_health=True,
            hang_before=hang_before,
            hang_for=hang_for,
        ),
        "overhead": Scenario(
            "overhead",
            ("floor", "service", "production"),
            threads=8,
            connections=WORKERS * 8,
            latency_ms=0,
            duration=max(3.0, 15 * scale),
            warmup=warmup,
        ),
        # The steady load on an empty database and on one holding a year of payments
        # (bench/year.py): the service only, contenders named for their database.
        "year": Scenario(
            "year",
            ("empty", "year"),
            threads=8,
            connections=WORKERS * 8,
            latency_ms=STEADY_LATENCY_MS,
            duration=max(3.0, 15 * scale),
            warmup=warmup,
        ),
        # The steady load on the service, then, on the same database, a partial refund of
        # each payment it made under the same load (bench/run.py run_refunds): the
        # contenders are the two phases of a round.
        "refunds": Scenario(
            "refunds",
            ("payments", "refunds"),
            threads=8,
            connections=WORKERS * 8,
            latency_ms=STEADY_LATENCY_MS,
            duration=max(3.0, 15 * scale),
            warmup=warmup,
        ),
    }


@dataclass
class Bench:
    """What every run shares: the sandbox, the databases, where files go."""

    sandbox: object  # tests.support.sandbox.SandboxProcess, started with TLS
    databases: Databases
    tmp_dir: Path
    sandbox_pid: int  # for its CPU time
    service_env: dict[str, str] = field(default_factory=dict)  # experiments: --service-env
    run_token: str = field(default_factory=lambda: secrets.token_hex(4))
    cloudwatch: object | None = None  # tests.support.moto.MotoServer: the production shape
    cloudwatch_pid: int | None = None  # for its CPU time

    def app_env(self, app: str, database_url: str, threads: int) -> dict[str, str]:
        env = {
            "DATABASE_URL": database_url,
            "PAYMENT_API_URL": self.sandbox.url,
            "PAYMENT_API_KEY": self.sandbox.api_key,
            "REQUESTS_CA_BUNDLE": self.sandbox.ca_bundle,
            "GUNICORN_WORKERS": str(WORKERS),
            "GUNICORN_THREADS": str(threads),
        }
        if app in ("service", "production"):
            env.update(SERVICE_ENV, API_KEYS=API_KEY, LOG_LEVEL="INFO", **self.service_env)
        elif app == "naive":
            env.update(NAIVE_ENV)
        if app == "production":
            env.update(self.production_env())
        return env

    @property
    def log_group(self) -> str:
        return f"pbench-{self.run_token}"

    def production_env(self) -> dict[str, str]:
        """The shared breaker and CloudWatch logging, on loopback, fake credentials."""
        if self.cloudwatch is None:
            raise RuntimeError("the production shape needs the moto server (Bench.cloudwatch)")
        none = str(self.tmp_dir / "no-aws-config")
        return {
            "REDIS_URL": PRODUCTION_REDIS_URL,
            "CLOUDWATCH_LOG_GROUP": self.log_group,
            "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": self.cloudwatch.url,
            "AWS_DEFAULT_REGION": CLOUDWATCH_REGION,
            "AWS_ACCESS_KEY_ID": FAKE_AWS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": FAKE_AWS["aws_secret_access_key"],
            "AWS_CONFIG_FILE": none,
            "AWS_SHARED_CREDENTIALS_FILE": none,
        }

    def reset_production(self) -> None:
        """An empty log group and a closed shared breaker before a production-shape run."""
        self.cloudwatch.reset()
        client = redis.Redis.from_url(PRODUCTION_REDIS_URL, socket_timeout=2)
        try:
            for key in client.scan_iter(BREAKER_KEYS):
                client.delete(key)
        finally:
            client.close()

    def cloudwatch_delivery(self) -> dict:
        """Log streams and events that reached CloudWatch (read after the workers exit)."""
        logs = boto3.client(
            "logs", endpoint_url=self.cloudwatch.url, region_name=CLOUDWATCH_REGION, **FAKE_AWS
        )
        streams = logs.describe_log_streams(logGroupName=self.log_group)["logStreams"]
        events = 0
        for stream in streams:
            token = None
            while True:
                page = logs.get_log_events(
                    logGroupName=self.log_group,
                    logStreamName=stream["logStreamName"],
                    startFromHead=True,
                    **({"nextToken": token} if token else {}),
                )
                events += len(page["events"])
                if not page["events"] or page["nextForwardToken"] == token:
                    break
                token = page["nextForwardToken"]
        return {"cloudwatch_streams": len(streams), "cloudwatch_events": events}


def measure(
    bench: Bench,
    scenario: Scenario,
    app: str,
    *,
    label: str | None = None,
    database: tuple[str, str] | None = None,
    refund_ids: Path | None = None,
) -> dict:
    """Run ``app`` under ``scenario`` once and return its figures.

    One wrk run covers warm-up and measurement, so the load is already steady when the
    measured window opens (new connections and the first requests are in the warm-up);
    the provider's behaviour changes at the window's start (and, for the hanging
    scenario, hangs and heals later). Figures count requests sent inside the window.

    ``database`` (name, url) is used instead of a fresh one; ``label`` names the run's
    files and figures instead of ``app``. With ``refund_ids`` (a file of payment ids in
    ``database``, made by an earlier run) every request is a partial refund of the next
    of those payments instead of a payment, and the sandbox keeps its charges; the
    "payment" figures are then per refund (a 201 answer).
    """
    label = label or app
    db_name, db_url = database or bench.databases.fresh(f"{scenario.name}_{label}")
    stored_before = bench.databases.payment_counts(db_name) if database else {}
    refunds_before = bench.databases.refund_counts(db_name) if refund_ids else {}
    bench.databases.wait_for_no_backends(db_name)  # the counts' own connections included
    activity_before = bench.databases.activity_counts(db_name)
    stem = f"{scenario.name}-{label}"
    if refund_ids is None:
        bench.sandbox.reset()
    bench.sandbox.set_faults(latency_ms=STEADY_LATENCY_MS)
    if app == "production":
        bench.reset_production()
    process = AppProcess(
        app,
        bench.app_env(app, db_url, scenario.threads),
        bench.tmp_dir / f"{stem}-{bench.run_token}.log",
    )
    log_start = process.stderr_path.stat().st_size if process.stderr_path.exists() else 0
    with process, ExitStack() as stack:
        poller = stack.enter_context(ActivityPoller(db_name))
        prober = None
        if scenario.probe_health:
            prober = stack.enter_context(
                HealthProber(process.url, max_seconds=scenario.warmup + scenario.duration + 30)
            )
        phases = _Phases(bench, process, db_name, scenario)
        stack.callback(phases.stop)
        phases.start()
        result = run_wrk(
            process.url,
            connections=scenario.connections,
            duration=scenario.warmup + scenario.duration,
            api_key=API_KEY,
            # Idempotency keys unique to this run: a reused database must not replay them.
            run_id=f"{bench.run_token}-{stem}-{secrets.token_hex(3)}",
            records_path=bench.tmp_dir / f"{stem}.txt",
            think_ms=scenario.think_ms,
            refund_ids=refund_ids,
        )
        marks = phases.stop()
        if "before" not in marks:
            raise RuntimeError(f"{stem}: the measured window never opened")
        after = _snapshot(bench, process, db_name, since=marks["before"]["stderr"])
    # After in-flight requests finished, and the app's backends added their counts.
    bench.databases.wait_for_no_backends(db_name)
    activity = bench.databases.activity_counts(db_name)
    stored = bench.databases.payment_counts(db_name)
    window = result.window(marks["before"]["time"])
    figures = _figures(scenario, label, window, marks, after, poller, prober, stored)
    figures["log_lines"] = process.count_in_stderr(
        "", log_start
    )  # the whole run, master and workers
    figures["stored_by_run"] = sum(stored.values()) - sum(stored_before.values())
    if refund_ids is not None:
        refunds = bench.databases.refund_counts(db_name)
        figures["stored_refunds"] = refunds
        figures["stored_by_run"] = sum(refunds["statuses"].values()) - sum(
            refunds_before["statuses"].values()
        )
    figures.update(_database_work(activity_before, activity, figures["stored_by_run"]))
    if app == "production":
        figures.update(bench.cloudwatch_delivery())  # the workers flushed it on exit
        figures["cloudwatch_cpu_ms_per_payment"] = _per(
            after["cloudwatch_cpu"] - marks["before"]["cloudwatch_cpu"], figures["payments_201"]
        )
    return figures


def _snapshot(bench: Bench, process: AppProcess, db_name: str, since: int | None = None) -> dict:
    """Counters to subtract: CPU seconds of the app, of its database backends and of the
    sandbox; the sandbox's connection and charge counts; the app's log size."""
    state = bench.sandbox.state()
    snap = {
        "time": time.time(),
        "cpu": process.cpu_seconds(),
        "db_cpu": {pid: own_cpu_seconds(pid) for pid in bench.databases.backend_pids(db_name)},
        "db_blocks": bench.databases.block_counts(db_name),
        "provider_cpu": own_cpu_seconds(bench.sandbox_pid),
        "cloudwatch_cpu": own_cpu_seconds(bench.cloudwatch_pid) if bench.cloudwatch_pid else 0.0,
        "connections": state["connections_accepted"],
        "charges": state["requests"].get("POST /v1/charges", 0),
        "refunds": state["requests"].get("POST /v1/refunds", 0),
        "stderr": process.stderr_size(),
        "machine_cpu": machine_cpu_seconds(),
    }
    if since is not None:
        snap["pool_exhausted"] = process.count_in_stderr(POOL_EXHAUSTED, since)
        snap["breaker_lines"] = process.stderr_lines(BREAKER_OPENED, since)
    return snap


class _Phases(threading.Thread):
    """Opens the measured window after the warm-up, then hangs and heals the provider.

    ``marks`` gets ``before`` (the snapshot at the window's start) and, in the hanging
    scenario, ``hang_start``/``heal`` (epoch s) and the charge counts at both.
    """

    def __init__(self, bench: Bench, process: AppProcess, db_name: str, scenario: Scenario):
        super().__init__(name="phases", daemon=True)
        self.bench, self.process, self.db_name, self.scenario = bench, process, db_name, scenario
        self.marks: dict = {}
        self._cancel = threading.Event()

    def _at(self, start: float, offset: float) -> bool:
        """Wait until ``offset`` s after ``start``; False if cancelled first."""
        return not self._cancel.wait(max(0.0, start + offset - time.monotonic()))

    def run(self) -> None:
        sandbox, scenario, marks = self.bench.sandbox, self.scenario, self.marks
        start = time.monotonic()
        if not self._at(start, scenario.warmup):
            return
        sandbox.set_faults(latency_ms=scenario.latency_ms)
        marks["before"] = _snapshot(self.bench, self.process, self.db_name)
        if not scenario.hang_for:
            return
        hang_at = scenario.warmup + scenario.hang_before
        if not self._at(start, hang_at):
            return
        marks["charges_at_hang"] = sandbox.state()["requests"].get("POST /v1/charges", 0)
        sandbox.set_faults(latency_ms=scenario.latency_ms, hang=True)
        marks["hang_start"] = time.time()
        if not self._at(start, hang_at + scenario.hang_for):
            return
        marks["charges_at_heal"] = sandbox.state()["requests"].get("POST /v1/charges", 0)
        sandbox.set_faults(latency_ms=scenario.latency_ms)
        marks["heal"] = time.time()

    def stop(self) -> dict:
        self._cancel.set()
        if self.is_alive():
            self.join(30)
        return self.marks


def _per(seconds: float, payments: int) -> float | None:
    """CPU milliseconds per payment."""
    return round(seconds / payments * 1000, 3) if payments else None


def _cores(cpu_seconds: float, before: dict, after: dict) -> float | None:
    """CPU seconds over the wall time between two snapshots."""
    elapsed = after["time"] - before["time"]
    return round(cpu_seconds / elapsed, 2) if elapsed > 0 else None


def _count_per(count: int, payments: int) -> float | None:
    return round(count / payments, 2) if payments else None


#: What the database did per object a run stored, by ``pg_stat_database`` counter.
_DATABASE_WORK = {
    "xact_commit": "db_commits_per_stored",
    "tup_inserted": "db_rows_inserted_per_stored",
    "tup_updated": "db_rows_updated_per_stored",
    "tup_fetched": "db_rows_fetched_per_stored",
}


def _database_work(before: dict, after: dict, stored: int) -> dict:
    """Transactions and rows per payment (or refund) the run stored, over the whole run
    (warm-up and requests still in flight at the end included: every request of a run
    does the same work, so the whole run gives exact counts)."""
    return {key: _count_per(after[c] - before[c], stored) for c, key in _DATABASE_WORK.items()}


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def _figures(scenario, app, load: LoadResult, marks, after, poller, prober, stored) -> dict:
    before = marks["before"]
    latencies = load.latencies()
    paid = load.count(201)
    summary = load.summary
    socket_errors = sum(summary.get(f"errors_{k}", 0) for k in ("connect", "read", "write"))
    cpu = after["cpu"] - before["cpu"]
    db_cpu = sum(c - before["db_cpu"].get(pid, 0.0) for pid, c in after["db_cpu"].items())
    provider_cpu = after["provider_cpu"] - before["provider_cpu"]
    figures = {
        "app": app,
        "duration_s": round(load.duration, 2),
        "requests": len(load.answers),
        "payments_201": paid,
        "throughput_per_s": round(paid / load.duration, 1) if load.duration else 0.0,
        "p50_ms": _ms(percentile(latencies, 50)),
        "p95_ms": _ms(percentile(latencies, 95)),
        "p99_ms": _ms(percentile(latencies, 99)),
        "statuses": {str(k): v for k, v in sorted(load.statuses.items())},
        "errors": sum(v for k, v in load.statuses.items() if k >= 400) + socket_errors,
        "socket_errors": socket_errors,
        "timeouts": load.timeouts(),
        "unanswered_at_end": load.unanswered,
        "provider_connections_run": after["connections"] - before["connections"],
        "provider_connections_total": after["connections"],
        "provider_charge_requests": after["charges"] - before["charges"],
        "provider_refund_requests": after["refunds"] - before["refunds"],
        "stopped_early": load.stopped_early,
        "db_peak_in_use": poller.peak(load.started, in_use=True),
        "db_peak_open": poller.peak(load.started, in_use=False),
        "pool_exhausted_errors": after["pool_exhausted"],
        "cpu_s": round(cpu, 2),
        "cpu_ms_per_payment": _per(cpu, paid),
        "db_cpu_ms_per_payment": _per(db_cpu, paid),
        "provider_cpu_ms_per_payment": _per(provider_cpu, paid),
        "system_cpu_ms_per_payment": _per(cpu + db_cpu + provider_cpu, paid),
        # Cores busy from the window's start to the end of the run: the measured processes
        # (app, PostgreSQL, sandbox), and the whole machine (with wrk, the kernel and any
        # other work on it).
        "measured_cores": _cores(cpu + db_cpu + provider_cpu, before, after),
        "machine_cores": _cores(after["machine_cpu"][0] - before["machine_cpu"][0], before, after),
        # Shared-buffer misses: blocks PostgreSQL had to read in (page cache or disk).
        "db_blocks_read_per_payment": _count_per(
            after["db_blocks"][1] - before["db_blocks"][1], paid
        ),
        "db_blocks_hit_per_payment": _count_per(
            after["db_blocks"][0] - before["db_blocks"][0], paid
        ),
        "stored_payments": stored,
        "wrk_output": load.wrk_output,
    }
    if prober is not None:
        health = prober.latencies(load.started)
        figures["healthz_p50_ms"] = _ms(percentile(health, 50))
        figures["healthz_p99_ms"] = _ms(percentile(health, 99))
        figures["healthz_max_ms"] = _ms(max(health, default=None))
        figures["healthz_probes"] = len(health)
        figures["healthz_failures"] = prober.failures(load.started)
    if scenario.hang_for:
        figures.update(_incident(load, marks, prober, after["breaker_lines"]))
        if "heal" in marks:
            figures["timeline"] = _timeline(load, prober, marks)
    return figures


def _incident(load: LoadResult, marks: dict, prober, breaker_lines: list[str]) -> dict:
    """Figures of the hanging-provider replay: fast failure, recovery, breaker openings."""
    hang, heal = marks.get("hang_start"), marks.get("heal")
    if hang is None or heal is None:
        return {"incident_error": "the fault schedule did not complete"}
    fast = next(
        (
            a
            for a in sorted(load.answers, key=lambda a: a.done)
            if a.status == 503 and a.latency < FAST_503_S and a.sent >= hang
        ),
        None,
    )
    failed_before_fast = None
    if fast is not None:
        failed_before_fast = sum(
            1
            for a in load.answers
            if a.sent >= hang and a.done <= fast.done and a.status != 201 and a.status != 503
        )
    recovered = min(
        (a.done for a in load.answers if a.status == 201 and a.done >= heal), default=None
    )
    during = prober.latencies(hang, heal) if prober else []
    return {
        "hang_s": round(heal - hang, 2),
        "first_fast_503_after_s": None if fast is None else round(fast.done - hang, 2),
        "failed_calls_before_first_fast_503": failed_before_fast,
        "breaker_opened_after_failures": [_breaker_failures(line) for line in breaker_lines],
        "breaker_opened_after_s": [
            round(_logged_at(line) - hang, 2) for line in breaker_lines if _logged_at(line)
        ],
        "charge_requests_during_hang": marks["charges_at_heal"] - marks["charges_at_hang"],
        "recovery_after_heal_s": None if recovered is None else round(recovered - heal, 2),
        "healthz_p99_during_hang_ms": _ms(percentile(during, 99)),
    }


def _breaker_failures(line: str) -> int | None:
    """N of "... circuit breaker opened after N consecutive failures"."""
    words = line.split(BREAKER_OPENED, 1)[1].split()
    return int(words[0]) if words and words[0].isdigit() else None


def _logged_at(line: str) -> float | None:
    """Epoch seconds of a JSON log line's ``time`` field (None if it has none)."""
    try:
        return datetime.fromisoformat(json.loads(line)["time"]).timestamp()
    except (ValueError, KeyError, TypeError):
        return None


def _timeline(load: LoadResult, prober, marks: dict) -> dict:
    """Outcomes per second (by when the client got them) and every probe, for the plot.

    Times are seconds since the load started. A timeout is placed where the client
    gave up: ``CLIENT_TIMEOUT_S`` after sending.
    """
    t0 = load.started
    outcomes: dict[int, Counter] = {}
    for a in load.answers:
        if a.latency > CLIENT_TIMEOUT_S:
            kind, at = "timeout", a.sent + CLIENT_TIMEOUT_S
        else:
            kind = {201: "201", 202: "202", 503: "503"}.get(a.status, "other")
            at = a.done
        outcomes.setdefault(math.floor(at - t0), Counter())[kind] += 1
    for sec, lost in load.lost().items():
        outcomes.setdefault(math.floor(sec + CLIENT_TIMEOUT_S - t0), Counter())["timeout"] += lost
    probes = [] if prober is None else prober.probes_since(t0)
    return {
        "hang_start_s": round(marks["hang_start"] - t0, 3),
        "heal_s": round(marks["heal"] - t0, 3),
        "outcomes_per_s": {str(s): dict(c) for s, c in sorted(outcomes.items())},
        "healthz": [
            [round(p.started - t0, 3), None if p.latency is None else round(p.latency * 1000, 2)]
            for p in probes
        ],
    }
