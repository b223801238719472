"""Start and stop the apps under gunicorn on loopback, and read their CPU time.

Each app gets a listening socket bound here on a free 127.0.0.1 port and handed to
gunicorn as ``fd://N`` (no race for the port), its own process group (stopped by that
group's id, nothing else), and its stderr in a file so alarm texts can be counted.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.05
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: The apps the bench runs, by name: their WSGI targets. ``production`` is the service
#: with the production shape's settings (``bench.scenarios.Bench.production_env``).
APPS = {
    "service": "wsgi:app",
    "production": "wsgi:app",
    "naive": "bench.naive_app:app",
    "floor": "bench.floor_app:app",
}
#: Variables of the caller that must not leak into an app under test.
SCRUBBED = (
    "PROMETHEUS_MULTIPROC_DIR",
    "BIND",
    "REDIS_URL",
    "CLOUDWATCH_LOG_GROUP",
    "DATABASE_URL",
    "PAYMENT_API_URL",
)


class AppError(RuntimeError):
    """An app did not start or answer."""


class AppProcess:
    """One gunicorn master and its workers serving ``app`` (a key of :data:`APPS`).

    ``env`` is added to the caller's environment (minus :data:`SCRUBBED`); it must hold
    ``GUNICORN_WORKERS`` and ``GUNICORN_THREADS``, which the naive and floor apps get
    as command-line flags (the service reads them in ``gunicorn.conf.py``).
    ``stderr_path`` receives everything the master and workers log.
    """

    def __init__(self, app: str, env: Mapping[str, str], stderr_path: Path):
        self.app = app
        self.env = dict(env)
        self.stderr_path = stderr_path
        self.url: str | None = None
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> AppProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self._process.pid

    def command(self, fd: int) -> list[str]:
        gunicorn = [sys.executable, "-m", "gunicorn"]
        if APPS[self.app] == APPS["service"]:
            return [*gunicorn, "-c", "gunicorn.conf.py", APPS[self.app]]
        return [
            *gunicorn,
            "--worker-class=gthread",
            f"--workers={self.env['GUNICORN_WORKERS']}",
            f"--threads={self.env['GUNICORN_THREADS']}",
            f"--bind=fd://{fd}",
            "--timeout=30",
            "--graceful-timeout=5",
            "--no-control-socket",
            APPS[self.app],
        ]

    def start(self, timeout: float = START_TIMEOUT_S) -> AppProcess:
        """Spawn gunicorn and return once ``/healthz`` answers 200."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
        env.update(self.env, BIND=f"fd://{listener.fileno()}")
        self.stderr_path.parent.mkdir(parents=True, exist_ok=True)
        with listener, open(self.stderr_path, "ab") as stderr:
            self._process = subprocess.Popen(
                self.command(listener.fileno()),
                cwd=ROOT,
                env=env,
                pass_fds=(listener.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )
        try:
            self._wait_healthy(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self, deadline: float) -> None:
        while True:
            if self._process.poll() is not None:
                raise AppError(f"{self.app} exited at start:\n{self.stderr_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AppError(f"{self.app} did not answer /healthz:\n{self.stderr_tail()}")
            time.sleep(POLL_INTERVAL_S)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the master, wait; SIGKILL its process group if it does not go."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout)

    def stderr_tail(self, size: int = 3000) -> str:
        return self.stderr_path.read_bytes()[-size:].decode(errors="replace")

    def stderr_size(self) -> int:
        return self.stderr_path.stat().st_size

    def count_in_stderr(self, text: str, since: int = 0) -> int:
        """Lines holding ``text`` logged after byte offset ``since``."""
        with open(self.stderr_path, "rb") as f:
            f.seek(since)
            return sum(text.encode() in line for line in f)

    def stderr_lines(self, text: str, since: int = 0) -> list[str]:
        with open(self.stderr_path, "rb") as f:
            f.seek(since)
            return [line.decode(errors="replace") for line in f if text.encode() in line]

    def cpu_seconds(self) -> float:
        """User + system CPU of the master and all its workers, reaped ones included."""
        master = _proc_stat(self.pid)
        if master is None:
            return 0.0
        ticks = sum(master[11:15])  # utime, stime, cutime, cstime of the master
        for child in _children(self.pid):
            stat = _proc_stat(child)
            if stat is not None:
                ticks += stat[11] + stat[12]
        return ticks / CLOCK_TICKS


def own_cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (0 if it is gone)."""
    stat = _proc_stat(pid)
    return 0.0 if stat is None else (stat[11] + stat[12]) / CLOCK_TICKS


def machine_cpu_seconds() -> tuple[float, float]:
    """``(busy, total)`` CPU seconds of the whole machine, all cores, since boot (from
    ``/proc/stat``; idle and I/O wait are not busy)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])  # user .. steal (guest time is already in user)
    return (total - fields[3] - fields[4]) / CLOCK_TICKS, total / CLOCK_TICKS


def find_child(marker: str) -> int | None:
    """The pid of a child of this process whose command line contains ``marker``."""
    for pid in _children(os.getpid()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if marker.encode() in cmdline:
            return pid
    return None


def _proc_stat(pid: int) -> list[int] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` as ints (index 11 is utime); None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return [int(f) if f.lstrip("-").isdigit() else 0 for f in fields]


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (scans /proc: ``task/*/children`` is not always there)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[1] == pid:
                children.append(int(entry.name))
    return children
