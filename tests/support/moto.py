"""A real moto server process on a free loopback port: CloudWatch Logs over HTTP for tests.

Started as ``python -m moto.server -H 127.0.0.1 -p 0`` (the kernel picks the port, so
parallel runs cannot collide); the port is read from the server's own start-up line and
the server is ready once its HTTP API answers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

_LISTENING = re.compile(rb"Running on http://127\.0\.0\.1:(\d+)")
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.05


class MotoServer:
    """One moto server process; use as a context manager, then read ``url``.

    port: 0 (the default) lets the kernel choose; a fixed port brings a server up
    where clients already point (an outage that ends).
    """

    def __init__(self, port: int = 0, startup_timeout: float = STARTUP_TIMEOUT):
        self.port = port
        self.startup_timeout = startup_timeout
        self.url: str | None = None
        self._process: subprocess.Popen | None = None
        self._log_path: str | None = None

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        fd, self._log_path = tempfile.mkstemp(prefix="moto-", suffix=".log")
        # Output goes to a file, not a pipe: moto logs every request and a pipe nobody
        # reads would fill and stall the server.
        with os.fdopen(fd, "wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + self.startup_timeout
        try:
            port = self._wait_for_port(deadline)
            self.url = f"http://127.0.0.1:{port}"
            self._wait_until_answering(deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(STOP_TIMEOUT)
            self._process = None
        if self._log_path is not None:
            os.unlink(self._log_path)
            self._log_path = None

    def reset(self) -> None:
        """Forget every resource (log groups, streams, events)."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()

    def _output(self) -> bytes:
        with open(self._log_path, "rb") as log:
            return log.read()

    def _wait_for_port(self, deadline: float) -> int:
        while time.monotonic() < deadline:
            match = _LISTENING.search(self._output())
            if match:
                return int(match.group(1))
            if self._process.poll() is not None:
                raise RuntimeError(f"moto server exited: {self._output()[-2000:]!r}")
            time.sleep(POLL_INTERVAL)
        raise TimeoutError(f"moto server printed no port within {self.startup_timeout} s")

    def _wait_until_answering(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(POLL_INTERVAL)
        raise TimeoutError(f"moto server at {self.url} did not answer within deadline")
