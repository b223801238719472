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
    ],
}


def _cell(value) -> str:
    if value is None:
        return "-"
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


def evaluate(results: dict, params: dict) -> list[dict]:
    """The targets of issue 6 that this run's figures can decide, each met or missed."""
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


def render(results: dict, targets: list[dict]) -> str:
    parts = [scenario_table(name, runs) for name, runs in results.items()]
    if targets:
        parts.append(targets_table(targets))
    return "\n\n".join(parts) + "\n"
