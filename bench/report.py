"""Turn the figures of a bench run into tables and a list of targets met or missed."""

from __future__ import annotations

#: Rows shown per scenario: (figure key, label).
ROWS = {
    "steady": [
        ("throughput_per_s", "payments/s (201)"),
        ("p50_ms", "p50 latency ms"),
        ("p99_ms", "p99 latency ms"),
        ("errors", "errors (4xx/5xx + socket)"),
        ("provider_connections_total", "provider TCP connections opened"),
        ("db_peak_in_use", "peak DB connections in use"),
        ("db_peak_open", "peak DB connections open"),
        ("cpu_ms_per_payment", "app CPU ms per payment"),
        ("db_cpu_ms_per_payment", "PostgreSQL CPU ms per payment"),
        ("provider_cpu_ms_per_payment", "sandbox CPU ms per payment"),
        ("system_cpu_ms_per_payment", "app + PostgreSQL + sandbox CPU ms"),
        ("rounds.throughput_per_s", "payments/s in each round"),
        ("log_lines", "log lines on stderr (whole run)"),
        ("cloudwatch_events", "CloudWatch events delivered (whole run)"),
        ("cloudwatch_cpu_ms_per_payment", "moto (CloudWatch) CPU ms per payment"),
    ],
    "slow": [
        ("throughput_per_s", "payments/s (201)"),
        ("p50_ms", "p50 latency ms"),
        ("p99_ms", "p99 latency ms"),
        ("statuses", "responses by status"),
        ("errors", "errors (4xx/5xx + socket)"),
        ("provider_connections_total", "provider TCP connections opened"),
        ("db_peak_in_use", "peak DB connections in use"),
        ("pool_exhausted_errors", "'connection pool exhausted' logged"),
        ("healthz_p99_ms", "/healthz p99 ms"),
        ("healthz_max_ms", "/healthz max ms"),
    ],
    "hang": [
        ("statuses", "responses by status"),
        ("timeouts", "client timeouts (> 30 s)"),
        ("pool_exhausted_errors", "'connection pool exhausted' logged"),
        ("healthz_p99_ms", "/healthz p99 ms (whole run)"),
        ("healthz_p99_during_hang_ms", "/healthz p99 ms (during hang)"),
        ("healthz_max_ms", "/healthz max ms"),
        ("first_fast_503_after_s", "first 503 < 50 ms, s after hang"),
        ("failed_calls_before_first_fast_503", "failed payments answered before it"),
        ("breaker_opened_after_failures", "breaker opened after N failures"),
        ("breaker_opened_after_s", "breaker opened, s after hang"),
        ("charge_requests_during_hang", "charge requests sent to the hung provider"),
        ("recovery_after_heal_s", "first 201 after heal, s"),
        ("db_peak_in_use", "peak DB connections in use"),
        ("provider_connections_total", "provider TCP connections opened"),
    ],
    "overhead": [
        ("throughput_per_s", "payments/s (201)"),
        ("payments_201", "payments (201)"),
        ("cpu_s", "app CPU s (master + workers)"),
        ("cpu_ms_per_payment", "app CPU ms per payment"),
        ("rounds.cpu_ms_per_payment", "app CPU ms per payment, each round"),
        ("db_cpu_ms_per_payment", "PostgreSQL CPU ms per payment"),
        ("system_cpu_ms_per_payment", "app + PostgreSQL + sandbox CPU ms"),
        ("p99_ms", "p99 latency ms"),
        ("cloudwatch_events", "CloudWatch events delivered (whole run)"),
        ("cloudwatch_cpu_ms_per_payment", "moto (CloudWatch) CPU ms per payment"),
    ],
    "year": [
        ("throughput_per_s", "payments/s (201)"),
        ("rounds.throughput_per_s", "payments/s in each round"),
        ("p50_ms", "p50 latency ms"),
        ("p99_ms", "p99 latency ms"),
        ("errors", "errors (4xx/5xx + socket)"),
        ("cpu_ms_per_payment", "app CPU ms per payment"),
        ("db_cpu_ms_per_payment", "PostgreSQL CPU ms per payment"),
        ("rounds.db_cpu_ms_per_payment", "PostgreSQL CPU ms per payment, each round"),
        ("db_blocks_hit_per_payment", "PostgreSQL blocks found in shared buffers per payment"),
        ("db_blocks_read_per_payment", "PostgreSQL blocks read in per payment"),
        ("db_peak_in_use", "peak DB connections in use"),
        ("stored_by_run", "payments stored by the best round (warm-up included)"),
        ("stored_payments", "payments stored after the best round"),
        ("fill.fill_s", "pre-fill s (insert, rebuild keys, vacuum, checkpoint)"),
        ("fill.rows", "rows pre-filled"),
        ("fill.size_mib", "MiB on disk after the fill (table + indexes)"),
        ("reconcile_pass_s", "reconciliation pass s"),
        ("reconcile_sql_s", "of which in SQL statements s"),
        ("reconcile_sql_statements", "SQL statements in the pass"),
        ("reconcile_report", "reconciliation report (payments)"),
        ("claim_uses_index", "claim query plan uses an index"),
        ("claim_execution_ms", "claim query ms (EXPLAIN ANALYZE; batch 1, 2)"),
    ],
    "refunds": [
        ("throughput_per_s", "payments or refunds/s (201)"),
        ("rounds.throughput_per_s", "per s, each round"),
        ("p50_ms", "p50 latency ms"),
        ("p95_ms", "p95 latency ms"),
        ("p99_ms", "p99 latency ms"),
        ("statuses", "responses by status (measured window)"),
        ("errors", "errors (4xx/5xx + socket)"),
        ("cpu_ms_per_payment", "app CPU ms per 201"),
        ("db_cpu_ms_per_payment", "PostgreSQL CPU ms per 201"),
        ("provider_cpu_ms_per_payment", "sandbox CPU ms per 201"),
        ("system_cpu_ms_per_payment", "app + PostgreSQL + sandbox CPU ms per 201"),
        ("rounds.system_cpu_ms_per_payment", "app + PostgreSQL + sandbox CPU ms, each round"),
        ("db_commits_per_stored", "PostgreSQL commits per payment/refund stored"),
        ("db_rows_inserted_per_stored", "rows inserted per payment/refund stored"),
        ("db_rows_updated_per_stored", "rows updated per payment/refund stored"),
        ("db_rows_fetched_per_stored", "rows fetched per payment/refund stored"),
        ("db_blocks_hit_per_payment", "PostgreSQL blocks found in shared buffers per 201"),
        ("db_peak_in_use", "peak DB connections in use"),
        ("provider_connections_run", "provider TCP connections opened in the window"),
        ("duration_s", "measured window s"),
        ("stopped_early", "ran out of payments to refund before its time"),
        ("payments_to_refund", "payments to refund (all the round's succeeded ones)"),
        ("stored_by_run", "payments / refunds stored by the best round"),
        ("stored_refunds", "refunds stored after the best round"),
        ("rounds.measured_cores", "cores busy: app + PostgreSQL + sandbox, each round"),
        ("rounds.machine_cores", "cores busy: whole machine, each round"),
        ("rounds.load_average", "load average (1 min) after each round's phase"),
    ],
}
#: Ratios of one run: (scenario, subject, the contenders it is set against).
RATIOS = (
    ("steady", "production", ("service", "floor", "naive")),
    ("overhead", "production", ("service", "floor")),
    ("year", "year", ("empty",)),
)
CPU_RATIOS = ("cpu_ms_per_payment", "db_cpu_ms_per_payment", "system_cpu_ms_per_payment")
#: The refunds scenario's refund / payment ratios, paired round by round: (key, label).
REFUND_RATIOS = (
    ("throughput_per_s", "per s (201)"),
    ("p50_ms", "p50 latency"),
    ("p95_ms", "p95 latency"),
    ("p99_ms", "p99 latency"),
    ("cpu_ms_per_payment", "app CPU per 201"),
    ("db_cpu_ms_per_payment", "PostgreSQL CPU per 201"),
    ("provider_cpu_ms_per_payment", "sandbox CPU per 201"),
    ("system_cpu_ms_per_payment", "app + PostgreSQL + sandbox CPU per 201"),
)
#: A refund "costs no more than a payment" when the median refund / payment ratio of
#: these figures is at most 1 + REFUND_NOISE: the rounds of one phase alone move by about
#: that much on this shared machine (docs/BENCHMARKS.md, "A refund against a payment").
REFUND_TARGETS = ("system_cpu_ms_per_payment", "p50_ms", "p99_ms")
REFUND_NOISE = 0.10


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return " ".join(f"{k}:{v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def _get(figures: dict, key: str):
    """``figures[key]``, where ``a.b`` reaches into a nested dict."""
    for part in key.split("."):
        figures = figures.get(part) if isinstance(figures, dict) else None
    return figures


def scenario_table(name: str, runs: dict[str, dict]) -> str:
    """A Markdown table: one row per figure, one column per app."""
    apps = list(runs)
    lines = [f"| {name} | " + " | ".join(apps) + " |", "|---" * (len(apps) + 1) + "|"]
    for key, label in ROWS[name]:
        lines.append(f"| {label} | " + " | ".join(_cell(_get(runs[a], key)) for a in apps) + " |")
    return "\n".join(lines)


def _ratio(a, b) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def paired_ratios(a: dict, b: dict, key: str = "throughput_per_s") -> list[float | None]:
    """Round i of ``a`` over round i of ``b``: the rounds alternate the order, so each
    pair ran back to back (one round: the one ratio)."""
    rounds_a, rounds_b = _get(a, f"rounds.{key}"), _get(b, f"rounds.{key}")
    if not rounds_a or not rounds_b:
        return [_ratio(a[key], b[key])]
    return [_ratio(x, y) for x, y in zip(rounds_a, rounds_b, strict=False)]


def median(values: list) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    middle = len(values) // 2
    return (
        values[middle] if len(values) % 2 else round((values[middle - 1] + values[middle]) / 2, 2)
    )


def evaluate(results: dict, params: dict) -> list[dict]:
    """The targets of issues 6, 12 and 14 that this run's figures can decide, each met
    or missed."""
    targets = []

    def check(name: str, value, met: bool | None, wanted: str) -> None:
        targets.append({"target": name, "value": value, "wanted": wanted, "met": met})

    steady = results.get("steady", {})
    service = steady.get("service")
    if service:
        for other, factor in (("floor", 0.9), ("naive", 1.25)):
            if other in steady:
                r = _ratio(service["throughput_per_s"], steady[other]["throughput_per_s"])
                check(
                    f"steady throughput vs {other}",
                    r,
                    r is not None and r >= factor,
                    f">= {factor}",
                )
        if "naive" in steady:
            p99, naive_p99 = service["p99_ms"], steady["naive"]["p99_ms"]
            check("steady p99 vs naive (ms)", f"{p99} vs {naive_p99}", p99 <= naive_p99, "<=")
        limit = params["workers"] * params["pool_maxsize"]["steady"]
        conns = service["provider_connections_total"]
        check("steady provider connections", conns, conns <= limit, f"<= {limit}")
    for name in ("slow", "hang"):
        run = results.get(name, {}).get("service")
        if not run:
            continue
        check(
            f"{name}: pool exhausted (service)",
            run["pool_exhausted_errors"],
            run["pool_exhausted_errors"] == 0,
            "0",
        )
        p99 = run.get("healthz_p99_ms")
        check(f"{name}: /healthz p99 ms (service)", p99, p99 is not None and p99 < 100, "< 100")
    hang = results.get("hang", {}).get("service")
    if hang:
        opened = [n for n in hang.get("breaker_opened_after_failures") or [] if n is not None]
        failures = params["breaker_failures"]
        check(
            "hang: breaker opened after N failures (per worker)",
            opened,
            bool(opened) and max(opened) <= failures,
            f"<= {failures}",
        )
        fast = hang.get("first_fast_503_after_s")
        check("hang: a fast 503 (< 50 ms) was served", fast, fast is not None, "yes")
        recovery = hang.get("recovery_after_heal_s")
        limit = params["breaker_reset"] + 2
        check(
            "hang: recovery s after heal",
            recovery,
            recovery is not None and recovery <= limit,
            f"<= {limit}",
        )
    year = results.get("year", {})
    if "year" in year and "empty" in year:
        full = year["year"]
        r = median(paired_ratios(full, year["empty"]))
        check(
            "year: steady throughput vs empty database (median of paired rounds)",
            r,
            r is not None and r >= 0.9,
            ">= 0.9",
        )
        if "reconcile_pass_s" in full:
            seconds = full["reconcile_pass_s"]
            check("year: reconciliation pass s", seconds, seconds < 1, "< 1")
            unknown, examined = params["year_unknown"], full["reconcile_report"]["examined"]
            check(
                "year: unknown payments the pass settled",
                examined,
                examined == unknown,
                f"{unknown}",
            )
            uses = full["claim_uses_index"]
            check("year: claim query plan uses an index", "yes" if uses else "no", uses, "yes")
    refunds = results.get("refunds", {})
    if "refunds" in refunds and "payments" in refunds:
        limit = round(1 + REFUND_NOISE, 2)
        labels = dict(REFUND_RATIOS)
        for key in REFUND_TARGETS:
            r = median(paired_ratios(refunds["refunds"], refunds["payments"], key))
            check(
                f"refunds: {labels[key]}, refund / payment (median of paired rounds)",
                r,
                r is not None and r <= limit,
                f"<= {limit}",
            )
    overhead = results.get("overhead", {})
    if "service" in overhead and "floor" in overhead:
        r = _ratio(
            overhead["service"]["cpu_ms_per_payment"], overhead["floor"]["cpu_ms_per_payment"]
        )
        check("overhead: CPU per payment vs floor", r, r is not None and r <= 1.5, "<= 1.5")
    return targets


def targets_table(targets: list[dict]) -> str:
    lines = ["| target | value | wanted | met |", "|---|---|---|---|"]
    for t in targets:
        met = "yes" if t["met"] else "NO"
        lines.append(f"| {t['target']} | {_cell(t['value'])} | {t['wanted']} | {met} |")
    return "\n".join(lines)


def ratios_table(results: dict) -> str | None:
    """Throughput and CPU per payment of one contender over another's: best rounds, round
    by round, and the median of the rounds (the rounds alternate the order, so round i
    of both ran back to back)."""
    lines = []
    for name, subject, others in RATIOS:
        runs = results.get(name, {})
        if subject not in runs:
            continue
        a = runs[subject]
        for other in (o for o in others if o in runs):
            b = runs[other]
            each = paired_ratios(a, b)
            cells = [
                _ratio(a["throughput_per_s"], b["throughput_per_s"]),
                each,
                median(each),
                *(median(paired_ratios(a, b, key)) for key in CPU_RATIOS),
            ]
            lines.append(f"| {name}: {subject} / {other} | " + " | ".join(map(_cell, cells)) + " |")
    if not lines:
        return None
    header = (
        "| ratio (one run) | payments/s, best rounds | payments/s, each round | median |"
        " app CPU/payment, median | PostgreSQL CPU/payment, median"
        " | app + PostgreSQL + sandbox CPU/payment, median |"
    )
    return "\n".join([header, "|---" * 7 + "|", *lines])


def refund_ratios_table(results: dict) -> str | None:
    """Refund / payment, each figure: round by round (the two phases of a round ran back
    to back on one database), their median, and the spread of the rounds of each phase
    alone (largest over smallest), which is the noise to read the ratios against."""
    runs = results.get("refunds", {})
    if "refunds" not in runs or "payments" not in runs:
        return None
    refunds, payments = runs["refunds"], runs["payments"]
    lines = [
        "| refund / payment | each round | median | spread of the payment rounds"
        " | spread of the refund rounds |",
        "|---" * 5 + "|",
    ]
    for key, label in REFUND_RATIOS:
        each = paired_ratios(refunds, payments, key)
        cells = [each, median(each), spread(payments, key), spread(refunds, key)]
        lines.append(f"| {label} | " + " | ".join(map(_cell, cells)) + " |")
    return "\n".join(lines)


def statements_table(results: dict) -> str | None:
    """What one payment and one refund ask of the database (``bench/statements.py``)."""
    counts = results.get("refunds", {}).get("refunds", {}).get("statements")
    if not counts:
        return None
    payment, refund = counts["payment"], counts["refund"]
    keys = sorted(set(payment) | set(refund), key=lambda k: (":" in k, k))
    lines = [
        f"| per request (in-process, {counts['requests']} of each) | payment | refund |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {_cell(payment.get(k, 0))} | {_cell(refund.get(k, 0))} |" for k in keys]
    return "\n".join(lines)


def spread(figures: dict, key: str) -> float | None:
    """Largest over smallest of the rounds' ``key`` (None with fewer than two rounds)."""
    values = [v for v in _get(figures, f"rounds.{key}") or [] if v]
    return round(max(values) / min(values), 2) if len(values) > 1 else None


def plans_text(results: dict) -> str | None:
    """The year scenario's claim query plans (EXPLAIN (ANALYZE, BUFFERS) text)."""
    plans = results.get("year", {}).get("year", {}).get("claim_plans") or []
    blocks = [f"claim query, batch {i}:\n\n```\n{plan}\n```" for i, plan in enumerate(plans, 1)]
    return "\n\n".join(blocks) or None


def render(results: dict, targets: list[dict]) -> str:
    parts = [scenario_table(name, runs) for name, runs in results.items()]
    extra = (
        ratios_table(results),
        refund_ratios_table(results),
        statements_table(results),
        plans_text(results),
    )
    parts += [p for p in extra if p]
    if targets:
        parts.append(targets_table(targets))
    return "\n\n".join(parts) + "\n"
