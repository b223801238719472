"""Start, probe and stop a real gunicorn (``gunicorn -c gunicorn.conf.py wsgi:app``).

The listening socket is bound here, on a free loopback port, and handed to gunicorn as
``BIND=fd://N``: no window in which another process could take the port between
choosing it and gunicorn binding it. Start-up waits for ``/healthz`` with a deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.05
#: Variables of the test runner that must not leak into the server under test.
SCRUBBED = ("PROMETHEUS_MULTIPROC_DIR", "BIND", "REDIS_URL", "CLOUDWATCH_LOG_GROUP")


class GunicornError(RuntimeError):
    """gunicorn did not start, or did not stop in time."""


class GunicornProcess:
    """One gunicorn master with its workers, serving the app on 127.0.0.1.

    ``env`` is added to the test runner's environment (minus :data:`SCRUBBED`), e.g.
    ``{"DATABASE_URL": ..., "API_KEYS": ..., "GUNICORN_WORKERS": "2"}``. Use as a
    context manager or call ``start``/``stop``; ``stderr`` holds everything the master
    and the workers logged.
    """

    def __init__(self, env: Mapping[str, str]):
        self.env = dict(env)
        self.url: str | None = None
        self.returncode: int | None = None
        self._process: subprocess.Popen | None = None
        self._stderr = None
        self._final_stderr: str | None = None

    def __enter__(self) -> GunicornProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self._process.pid

    def start(self, timeout: float = START_TIMEOUT_S) -> GunicornProcess:
        """Spawn gunicorn and return once ``/healthz`` answers 200."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
        env.update(self.env, BIND=f"fd://{listener.fileno()}")
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives until stop()
        with listener:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                cwd=ROOT,
                env=env,
                pass_fds=(listener.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=self._stderr,
                stderr=self._stderr,
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
                raise GunicornError(f"gunicorn exited at start:\n{self.stderr[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise GunicornError(f"gunicorn did not answer /healthz:\n{self.stderr[-3000:]}")
            time.sleep(POLL_INTERVAL_S)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self._process.send_signal(signum)

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """Wait for the master to exit on its own; ``GunicornError`` if it does not in time."""
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GunicornError(f"gunicorn still running after {timeout}s") from None
        return self.stop()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (graceful), wait, SIGKILL if it does not go; return the exit code."""
        process, self._process = self._process, None
        if process is None:
            return self.returncode
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        self.returncode = process.returncode
        self._final_stderr = self.stderr
        self._stderr.close()
        return self.returncode

    @property
    def stderr(self) -> str:
        """Everything logged so far (master, workers, access log), also after ``stop``."""
        if self._final_stderr is not None:
            return self._final_stderr
        # pread, not seek+read: the file offset is shared with gunicorn, which would then
        # write its next lines over older ones.
        fd = self._stderr.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")
