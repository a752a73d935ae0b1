"""A throwaway ``redis-server`` process on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

__all__ = ["LocalRedisServer", "find_redis_server"]

_SEARCHED = ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server")


def find_redis_server() -> str | None:
    """Path of the ``redis-server`` executable (``PATH``, then the Debian locations), or ``None``."""
    found = shutil.which("redis-server")
    if found:
        return found
    return next((path for path in _SEARCHED if os.access(path, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalRedisServer:
    """``redis-server`` bound to 127.0.0.1 with no persistence of its own (snapshots, if asked for
    with ``SAVE``, go to ``directory``; a temporary one, removed by :meth:`stop`, if not given).
    :meth:`start` waits until it answers; :meth:`kill` stops it at once (SIGKILL); starting again
    reuses the port."""

    def __init__(self, directory: str | None = None, executable: str | None = None, start_timeout_s: float = 10.0):
        executable = executable or find_redis_server()
        if executable is None:
            raise FileNotFoundError("redis-server not found (Debian: apt-get install -y redis-server)")
        self.executable = executable
        self._owns_directory = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="dynamicemb-redis-")
        os.makedirs(self.directory, exist_ok=True)
        self.start_timeout_s = start_timeout_s
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "redis.log")

    def start(self) -> LocalRedisServer:
        # fmt: off
        args = [
            self.executable, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.directory,
            "--save", "", "--appendonly", "no", "--logfile", self.log_path, "--daemonize", "no",
        ]
        # fmt: on
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        self.kill()
        log = ""
        if os.path.exists(self.log_path):
            with open(self.log_path) as f:
                log = f.read()[-2000:]
        raise RuntimeError(
            f"redis-server on 127.0.0.1:{self.port} did not start within {self.start_timeout_s} s:\n{log}"
        )

    def kill(self) -> None:
        """SIGKILL the server (what a crash looks like to its clients) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> LocalRedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
