"""``python -m bench.run [--quick] [--scenarios steady,slow,hang,overhead,year,refunds] ...``.

One command for the whole comparison: PostgreSQL (started by
``scripts/ensure_services.sh`` when down), a TLS sandbox provider (and, for the
production shape, Redis and a moto server standing in for CloudWatch), then per
scenario each app under gunicorn on loopback with a fresh database, loaded by wrk from
its own process. The year scenario loads the service on an empty database and on one
pre-filled with a year of payments, then times a reconciliation pass over it. The
refunds scenario loads the service with payments, then with a partial refund of each
of those payments, round after round. Prints
the tables and the targets; writes ``results.json`` and ``results.txt`` plus wrk's own
output to the output directory, and the incident timeline picture when the hanging
scenario ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from bench import report, year
from bench.databases import Databases
from bench.load import CLIENT_TIMEOUT_S, PROBE_INTERVAL_S, ensure_wrk
from bench.procs import APPS, ROOT, SCRUBBED, find_child
from bench.scenarios import (
    API_KEY,
    NAIVE_ENV,
    SERVICE_ENV,
    WORKERS,
    Bench,
    measure,
    scenarios,
)
from settings import load_settings
from tests.support.moto import MotoServer
from tests.support.sandbox import SandboxProcess

OUT_DIR = ROOT / "bench" / "out"
QUICK_OUT_DIR = OUT_DIR / "tmp" / "quick"
PLOT_PATH = ROOT / "docs" / "incident_timeline.png"
#: Scenarios that measure capacity, run ``--repeat`` times; and what each round keeps.
REPEATED = ("steady", "overhead", "year", "refunds")
ROUND_FIGURES = (
    "throughput_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "cpu_ms_per_payment",
    "db_cpu_ms_per_payment",
    "provider_cpu_ms_per_payment",
    "system_cpu_ms_per_payment",
)
DEFAULT_SCENARIOS = "steady,slow,hang,overhead,year,refunds"
#: Rounds without ``--repeat`` (``--quick``: 1); the refunds scenario's ratios are judged
#: on the median of its paired rounds, so it gets an odd number.
DEFAULT_ROUNDS = 2
DEFAULT_REFUND_ROUNDS = 3
#: Each refund of the refunds scenario gives back this much of a 25.99 payment.
REFUND_AMOUNT = "5.00"
#: Without ``--quick`` the year scenario fills this many payments; with it, far fewer.
QUICK_YEAR_PAYMENTS = 20_000


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few seconds per scenario")
    parser.add_argument("--scenarios", default=DEFAULT_SCENARIOS, help="comma-separated, in order")
    parser.add_argument(
        "--apps",
        default="",
        help="only these apps: floor,naive,service,production (year always runs the service)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help=f"rounds of steady, overhead, year (default {DEFAULT_ROUNDS}) and refunds "
        f"(default {DEFAULT_REFUND_ROUNDS}); --quick: 1",
    )
    parser.add_argument(
        "--year-payments",
        type=int,
        help=f"payments the year scenario pre-fills (default {year.PAYMENTS:,}; "
        f"--quick: {QUICK_YEAR_PAYMENTS:,})",
    )
    parser.add_argument(
        "--refunds-stale-stats",
        action="store_true",
        help="refunds scenario: no ANALYZE between a round's payments and its refunds (left "
        "to autovacuum: in a short run the payments table keeps an empty table's statistics)",
    )
    parser.add_argument(
        "--out", type=Path, help=f"output directory (default {OUT_DIR}; --quick: {QUICK_OUT_DIR})"
    )
    parser.add_argument(
        "--plot", type=Path, help=f"timeline picture (default {PLOT_PATH}, or in --out if given)"
    )
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra service setting for an experiment (repeatable), e.g. PAYMENT_POOL_TIMEOUT=0",
    )
    args = parser.parse_args(argv)
    try:
        args.service_env = dict(item.split("=", 1) for item in args.service_env)
    except ValueError:
        parser.error("--service-env takes NAME=VALUE")
    known = scenarios(args.quick)
    args.scenario_names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenario_names) - set(known)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))} (know {', '.join(known)})")
    args.app_names = {a.strip() for a in args.apps.split(",") if a.strip()}
    if args.app_names - set(APPS):
        parser.error(f"--apps takes {', '.join(sorted(APPS))}")
    args.year_payments = args.year_payments or (
        QUICK_YEAR_PAYMENTS if args.quick else year.PAYMENTS
    )
    if args.year_payments < year.UNKNOWN:
        parser.error(f"--year-payments must be at least {year.UNKNOWN}")
    args.out = args.out or (QUICK_OUT_DIR if args.quick else OUT_DIR)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.refund_rounds = args.repeat or (1 if args.quick else DEFAULT_REFUND_ROUNDS)
    args.repeat = args.repeat or (1 if args.quick else DEFAULT_ROUNDS)
    default_plot = PLOT_PATH if args.out == OUT_DIR else args.out / "incident_timeline.png"
    args.plot = args.plot or default_plot
    return args


def machine(databases: Databases, wrk: str) -> dict:
    meminfo = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    wrk_version = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(int(meminfo[1]) / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": databases.server_version(),
        "wrk": (wrk_version.stdout or wrk_version.stderr).split("\n", 1)[0].strip(),
    }


def parameters(args: argparse.Namespace, bench: Bench) -> dict:
    """The settings the figures were measured with (the service's as it resolves them)."""
    quick, names = args.quick, args.scenario_names
    chosen = {name: scenario for name, scenario in scenarios(quick).items() if name in names}
    env = {**SERVICE_ENV, **args.service_env}
    defaults = load_settings(env)
    production = {}
    if bench.cloudwatch is not None:
        production = {k: v for k, v in bench.production_env().items() if "SECRET" not in k}
    return {
        "workers": WORKERS,
        "service_env": env,
        "production_env": production,
        "naive_env": NAIVE_ENV,
        "year_payments": args.year_payments if "year" in names else None,
        "year_unknown": year.UNKNOWN if "year" in names else None,
        "reconcile_older_than_s": year.RECONCILE_OLDER_THAN_S if "year" in names else None,
        "refund_amount": REFUND_AMOUNT if "refunds" in names else None,
        "refund_rounds": args.refund_rounds if "refunds" in names else None,
        "refunds_analyze_between_phases": not args.refunds_stale_stats
        if "refunds" in names
        else None,
        "breaker_failures": defaults.payment_breaker_failures,
        "breaker_reset": defaults.payment_breaker_reset,
        "payment_pool_timeout": defaults.payment_pool_timeout,
        "payment_deadline": defaults.payment_deadline,
        "payment_read_timeout": defaults.payment_read_timeout,
        "pool_maxsize": {
            n: load_settings({**env, "GUNICORN_THREADS": str(s.threads)}).payment_pool_maxsize
            for n, s in chosen.items()
        },
        "client_timeout_s": CLIENT_TIMEOUT_S,
        "probe_interval_s": PROBE_INTERVAL_S,
        "scenarios": {n: s.__dict__ for n, s in chosen.items()},
    }


def run_scenario(bench: Bench, scenario, args) -> dict[str, dict]:
    """Each app's figures (see :func:`run_rounds`)."""
    rounds = args.repeat if scenario.name in REPEATED else 1
    if scenario.name == "year":
        return run_year(bench, scenario, args, rounds)
    if scenario.name == "refunds":
        return run_refunds(bench, scenario, args, args.refund_rounds)
    apps = [a for a in scenario.apps if not args.app_names or a in args.app_names]
    return run_rounds(scenario, apps, rounds, args, lambda app: measure(bench, scenario, app))


def run_year(bench: Bench, scenario, args, rounds: int) -> dict[str, dict]:
    """The service on an empty database against one holding a year of payments (filled
    once, before the rounds), then a reconciliation pass over the full one."""
    filled = bench.databases.fresh("year_filled")
    print(f"bench: year / filling {args.year_payments:,} payments ...", file=sys.stderr, flush=True)
    fill = year.fill(filled[1], args.year_payments)

    def run_one(contender: str) -> dict:
        database = filled if contender == "year" else None
        return measure(bench, scenario, "service", label=contender, database=database)

    runs = run_rounds(scenario, list(scenario.apps), rounds, args, run_one)
    print("bench: year / reconciliation pass ...", file=sys.stderr, flush=True)
    runs["year"].update(fill=fill, **year.reconcile(bench, filled[1]))
    return runs


def run_refunds(bench: Bench, scenario, args, rounds: int) -> dict[str, dict]:
    """Round after round, on a fresh database each: the steady load of payments on the
    service, then the same load of partial refunds, one of each payment the first phase
    stored (warm-up included), each under its own key. The refund phase ends early if it
    runs out of payments. A refund needs its payment, so each round runs its payments
    first; paired rounds are the two phases of one round.

    Between the phases the database is analysed, as autovacuum would have done within a
    minute on a live table (``--refunds-stale-stats``: not). After the rounds, a child
    process counts what one payment and one refund ask of the database
    (``bench/statements.py``), on the last round's database."""
    phases: dict[str, list[dict]] = {"payments": [], "refunds": []}
    database = None
    for round_ in range(rounds):
        database = bench.databases.fresh(f"refunds_{round_ + 1}")
        suffix = f"-{round_ + 1}" if rounds > 1 else ""
        for phase in phases:
            print(f"bench: refunds / {phase} ...", file=sys.stderr, flush=True)
            ids_path = None
            if phase == "refunds":
                if not args.refunds_stale_stats:
                    bench.databases.analyze(database[0])
                ids = bench.databases.succeeded_payment_ids(database[0])
                ids_path = bench.tmp_dir / f"refunds-payment-ids{suffix}.txt"
                ids_path.write_text("".join(f"{i}\n" for i in ids))
            figures = measure(
                bench, scenario, "service", label=phase, database=database, refund_ids=ids_path
            )
            if ids_path is not None:
                figures["payments_to_refund"] = len(ids)
            figures["load_average"] = round(os.getloadavg()[0], 2)
            wrk_output = figures.pop("wrk_output")
            (args.out / f"wrk-{scenario.name}-{phase}{suffix}.txt").write_text(wrk_output)
            phases[phase].append(figures)
    chosen = _keep_best(phases, rounds)
    print("bench: refunds / statements per request ...", file=sys.stderr, flush=True)
    chosen["refunds"]["statements"] = statement_counts(bench, database[1])
    return chosen


def statement_counts(bench: Bench, url: str, requests: int = 20) -> dict:
    """``bench/statements.py`` in a child process configured like the service."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env.update(
        SERVICE_ENV,
        **bench.service_env,
        DATABASE_URL=url,
        PAYMENT_API_URL=bench.sandbox.url,
        PAYMENT_API_KEY=bench.sandbox.api_key,
        REQUESTS_CA_BUNDLE=bench.sandbox.ca_bundle,
        API_KEYS=API_KEY,
    )
    log = bench.tmp_dir / f"statements-{bench.run_token}.log"
    with open(log, "ab") as stderr:
        completed = subprocess.run(
            [sys.executable, "-m", "bench.statements", "--requests", str(requests)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            timeout=120,
            check=False,
        )
    if completed.returncode != 0:
        tail = log.read_bytes()[-2000:].decode(errors="replace")
        raise RuntimeError(f"bench.statements failed:\n{tail}")
    return json.loads(completed.stdout)


def _keep_best(runs: dict[str, list[dict]], rounds: int) -> dict[str, dict]:
    """Each contender's round with the best throughput (interference only ever slows a
    run), with every round's figures beside it when there were several."""
    chosen = {}
    for app, app_runs in runs.items():
        best = max(app_runs, key=lambda f: f["throughput_per_s"])
        if rounds > 1:
            best["rounds"] = {k: [f.get(k) for f in app_runs] for k in ROUND_FIGURES}
            for key in ("load_average", "measured_cores", "machine_cores"):
                best["rounds"][key] = [f.get(key) for f in app_runs]
        chosen[app] = best
    return chosen


def run_rounds(scenario, apps, rounds: int, args, run_one) -> dict[str, dict]:
    """Each app's figures; capacity scenarios run ``--repeat`` rounds, alternating the app
    order (A B C, C B A ...) so drift on a shared machine hits every app alike, and keep
    each app's round with the best throughput (interference only ever slows a run)."""
    runs: dict[str, list[dict]] = {app: [] for app in apps}
    for round_ in range(rounds):
        for app in apps if round_ % 2 == 0 else apps[::-1]:
            print(f"bench: {scenario.name} / {app} ...", file=sys.stderr, flush=True)
            figures = run_one(app)
            figures["load_average"] = round(os.getloadavg()[0], 2)
            suffix = f"-{round_ + 1}" if rounds > 1 else ""
            wrk_output = figures.pop("wrk_output")
            (args.out / f"wrk-{scenario.name}-{app}{suffix}.txt").write_text(wrk_output)
            runs[app].append(figures)
    return _keep_best(runs, rounds)


def main(argv=None) -> int:
    args = parse_args(argv)
    wrk = ensure_wrk()
    subprocess.run([str(ROOT / "scripts" / "ensure_services.sh")], check=True, timeout=120)
    tmp_dir = args.out / "tmp"  # logs and per-request records: kept out of git
    tmp_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*tmp_dir.glob("*.log"), *tmp_dir.glob("*.txt"), *args.out.glob("wrk-*.txt")]:
        stale.unlink()
    command = "python -m bench.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    all_scenarios = scenarios(args.quick)
    results: dict[str, dict] = {}
    started = time.monotonic()
    with ExitStack() as stack:
        databases = stack.enter_context(Databases())
        sandbox = stack.enter_context(SandboxProcess(tls=True))
        info = machine(databases, wrk)
        bench = Bench(
            sandbox,
            databases,
            tmp_dir,
            sandbox_pid=find_child("sandbox_provider"),
            service_env=args.service_env,
        )
        if any("production" in all_scenarios[name].apps for name in args.scenario_names) and (
            not args.app_names or "production" in args.app_names
        ):
            bench.cloudwatch = stack.enter_context(MotoServer())
            bench.cloudwatch_pid = find_child("moto.server")
        for name in args.scenario_names:
            results[name] = run_scenario(bench, all_scenarios[name], args)
        params = parameters(args, bench)
    targets = report.evaluate(results, params)
    table = report.render(results, targets)
    document = {
        "command": command.strip(),
        "quick": args.quick,
        "elapsed_s": round(time.monotonic() - started, 1),
        "machine": info,
        "parameters": params,
        "results": results,
        "targets": targets,
    }
    (args.out / "results.json").write_text(json.dumps(document, indent=1, default=str) + "\n")
    (args.out / "results.txt").write_text(table)
    print(table)
    if "hang" in results:
        from bench.plot import plot_incident

        print(f"bench: timeline -> {plot_incident(results['hang'], args.plot)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
