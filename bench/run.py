"""``python -m bench.run [--quick] [--scenarios steady,slow,hang,overhead] [--apps ...]``.

One command for the whole comparison: PostgreSQL (started by
``scripts/ensure_services.sh`` when down), a TLS sandbox provider, then per scenario
each app under gunicorn on loopback with a fresh database, loaded by wrk from its own
process. Prints the tables and the targets; writes ``results.json`` and
``results.txt`` plus wrk's own output to the output directory, and the incident
timeline picture when the hanging scenario ran.
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
from pathlib import Path

from bench import report
from bench.databases import Databases
from bench.load import CLIENT_TIMEOUT_S, PROBE_INTERVAL_S, ensure_wrk
from bench.procs import ROOT, find_child
from bench.scenarios import (
    NAIVE_ENV,
    SERVICE_ENV,
    WORKERS,
    Bench,
    measure,
    scenarios,
)
from settings import load_settings
from tests.support.sandbox import SandboxProcess

OUT_DIR = ROOT / "bench" / "out"
QUICK_OUT_DIR = OUT_DIR / "tmp" / "quick"
PLOT_PATH = ROOT / "docs" / "incident_timeline.png"
#: Scenarios that measure capacity, run ``--repeat`` times; and what each round keeps.
REPEATED = ("steady", "overhead")
ROUND_FIGURES = ("throughput_per_s", "p99_ms", "cpu_ms_per_payment", "system_cpu_ms_per_payment")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few seconds per scenario")
    parser.add_argument(
        "--scenarios", default="steady,slow,hang,overhead", help="comma-separated, in order"
    )
    parser.add_argument("--apps", default="", help="only these apps: floor,naive,service")
    parser.add_argument(
        "--repeat", type=int, help="rounds of steady and overhead (default 2; --quick: 1)"
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
    if args.app_names - {"floor", "naive", "service"}:
        parser.error("--apps takes floor, naive and service")
    args.out = args.out or (QUICK_OUT_DIR if args.quick else OUT_DIR)
    args.repeat = args.repeat or (1 if args.quick else 2)
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


def parameters(quick: bool, names: list[str], service_env: dict[str, str]) -> dict:
    """The settings the figures were measured with (the service's as it resolves them)."""
    chosen = {name: scenario for name, scenario in scenarios(quick).items() if name in names}
    env = {**SERVICE_ENV, **service_env}
    defaults = load_settings(env)
    return {
        "workers": WORKERS,
        "service_env": env,
        "naive_env": NAIVE_ENV,
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
    """Each app's figures; capacity scenarios run ``--repeat`` rounds, alternating the app
    order (A B C, C B A ...) so drift on a shared machine hits every app alike, and keep
    each app's round with the best throughput (interference only ever slows a run)."""
    apps = [a for a in scenario.apps if not args.app_names or a in args.app_names]
    rounds = args.repeat if scenario.name in REPEATED else 1
    runs: dict[str, list[dict]] = {app: [] for app in apps}
    for round_ in range(rounds):
        for app in apps if round_ % 2 == 0 else apps[::-1]:
            print(f"bench: {scenario.name} / {app} ...", file=sys.stderr, flush=True)
            figures = measure(bench, scenario, app)
            suffix = f"-{round_ + 1}" if rounds > 1 else ""
            wrk_output = figures.pop("wrk_output")
            (args.out / f"wrk-{scenario.name}-{app}{suffix}.txt").write_text(wrk_output)
            runs[app].append(figures)
    chosen = {}
    for app, app_runs in runs.items():
        best = max(app_runs, key=lambda f: f["throughput_per_s"])
        if rounds > 1:
            best["rounds"] = {k: [f[k] for f in app_runs] for k in ROUND_FIGURES}
        chosen[app] = best
    return chosen


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
    with Databases() as databases, SandboxProcess(tls=True) as sandbox:
        info = machine(databases, wrk)
        bench = Bench(
            sandbox,
            databases,
            tmp_dir,
            sandbox_pid=find_child("sandbox_provider"),
            service_env=args.service_env,
        )
        for name in args.scenario_names:
            results[name] = run_scenario(bench, all_scenarios[name], args)
    params = parameters(args.quick, args.scenario_names, args.service_env)
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
