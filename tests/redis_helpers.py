"""A real redis-server for the tests (`pytest_plugins = ["redis_helpers"]`).

Debian's redis-server (make install-test-tools) on 127.0.0.1, a free port,
its own directory, AOF persistence on (appendonly yes, appendfsync always,
as deploy/ runs it), stopped after the module. `kill()` is SIGKILL, the
fault a crash is; `start()` again on the same port and directory reloads
the AOF.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest_serve import free_port
from tool_helpers import require_tool


def _ping(port: int) -> bool:
    """True when the server serves data: a GET answers (not -LOADING while it
    reads its AOF; -NOAUTH where it wants a password)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET bsbr-test-probe\r\n")
            return s.recv(64).startswith((b"$-1", b"-NOAUTH"))
    except OSError:
        return False


# The tests' persistence: what deploy/ runs.
TEST_OPTIONS = ("--appendonly", "yes", "--appendfsync", "always", "--save", "")


class RedisServer:
    """options: redis-server's own (a config file and/or --name value pairs);
    where it listens and writes is set here, after them, so it wins."""

    def __init__(self, binary: str, directory: Path, port: int | None = None, options=TEST_OPTIONS):
        self.binary = binary
        self.dir = directory
        self.port = port or free_port()
        self.options = list(options)
        self.proc: subprocess.Popen | None = None
        self.dir.mkdir(parents=True, exist_ok=True)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout_s: float = 30.0) -> None:
        args = [self.binary, *self.options, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
                "--daemonize", "no", "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not _ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "redis.log").read_text() if (self.dir / "redis.log").exists() else ""
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log[-2000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; what was acknowledged is in the AOF."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.proc = None


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(require_tool("redis-server"), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def running_config(options, directory: Path, password: str | None = None) -> dict[str, str]:
    """The configuration a redis-server started with `options` runs with (CONFIG GET *)."""
    import redis

    server = RedisServer(require_tool("redis-server"), directory, options=options)
    server.start()
    try:
        client = redis.Redis(host="127.0.0.1", port=server.port, password=password, decode_responses=True)
        try:
            return client.config_get("*")
        finally:
            client.close()
    finally:
        server.stop()
