"""The incident replay as a picture: ``docs/incident_timeline.png``.

matplotlib is imported only here, lazily, with the Agg backend (no display needed);
the rest of the bench runs without it.
"""

from __future__ import annotations

from pathlib import Path

from bench.load import PROBE_TIMEOUT_S

OUTCOMES = [  # (key in the timeline, legend label, colour)
    ("201", "201 paid", "#2e7d32"),
    ("202", "202 outcome unknown", "#f9a825"),
    ("503", "503 (Retry-After)", "#ef6c00"),
    ("other", "other errors", "#c62828"),
    ("timeout", "client timeout (> 30 s)", "#212121"),
]


def plot_incident(runs: dict[str, dict], path: Path) -> Path:
    """Draw one panel per app (outcomes per second over ``/healthz`` latency) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    apps = [app for app, run in runs.items() if "timeline" in run]
    fig, axes = plt.subplots(
        len(apps) * 2,
        1,
        figsize=(11, 4.2 * len(apps)),
        sharex=True,
        gridspec_kw={"height_ratios": [3, 2] * len(apps)},
        squeeze=False,
    )
    for i, app in enumerate(apps):
        _draw_app(app, runs[app], axes[2 * i][0], axes[2 * i + 1][0])
    axes[-1][0].set_xlabel("seconds since the load started")
    fig.suptitle(
        "Incident replay: the provider hangs every charge, then heals "
        "(same load, gunicorn 2 workers x 32 threads)",
        fontsize=12,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_app(app: str, run: dict, outcomes_ax, health_ax) -> None:
    timeline = run["timeline"]
    hang, heal = timeline["hang_start_s"], timeline["heal_s"]
    per_second = {int(s): counts for s, counts in timeline["outcomes_per_s"].items()}
    seconds = sorted(per_second)
    bottom = [0] * len(seconds)
    for key, label, colour in OUTCOMES:
        values = [per_second[s].get(key, 0) for s in seconds]
        if any(values):
            outcomes_ax.bar(
                [s + 0.5 for s in seconds], values, 1.0, bottom=bottom, color=colour, label=label
            )
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    outcomes_ax.set_ylim(0, max(bottom, default=1) * 1.4)  # room for the legend above the bars
    outcomes_ax.set_ylabel("responses / s")
    outcomes_ax.set_title(
        f"{app}: payment outcomes per second  ('connection pool exhausted' logged "
        f"{run['pool_exhausted_errors']} times)",
        loc="left",
        fontsize=11,
    )
    outcomes_ax.legend(loc="upper right", fontsize=8, ncol=3)

    probes = timeline["healthz"]
    answered = [(t, ms) for t, ms in probes if ms is not None]
    failed = [t for t, ms in probes if ms is None]
    health_ax.scatter([t for t, _ in answered], [ms for _, ms in answered], s=4, color="#1565c0")
    if failed:
        top = PROBE_TIMEOUT_S * 1000
        health_ax.scatter(
            failed,
            [top] * len(failed),
            s=12,
            marker="x",
            color="#c62828",
            label=f"no answer in {PROBE_TIMEOUT_S:g} s",
        )
        health_ax.legend(loc="upper right", fontsize=8)
    health_ax.axhline(100, color="#757575", linestyle="--", linewidth=0.8)
    health_ax.text(0.2, 110, "100 ms", fontsize=7, color="#757575")
    health_ax.set_yscale("log")
    health_ax.set_ylim(0.5, PROBE_TIMEOUT_S * 1000 * 2)
    health_ax.set_ylabel("/healthz ms")
    health_ax.set_title(
        f"{app}: /healthz latency, a probe every 50 ms (p99 {run['healthz_p99_ms']} ms)",
        loc="left",
        fontsize=10,
    )
    for ax in (outcomes_ax, health_ax):
        ax.axvspan(hang, heal, color="#ffcdd2", alpha=0.35, zorder=0)
        ax.axvline(hang, color="#c62828", linewidth=0.8)
        ax.axvline(heal, color="#2e7d32", linewidth=0.8)
    outcomes_ax.text(
        hang,
        outcomes_ax.get_ylim()[1] * 0.8,
        " provider hangs",
        fontsize=8,
        color="#c62828",
        va="top",
    )
    outcomes_ax.text(
        heal, outcomes_ax.get_ylim()[1] * 0.8, " healed", fontsize=8, color="#2e7d32", va="top"
    )
