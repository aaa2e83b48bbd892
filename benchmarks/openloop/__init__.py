"""An open-loop HTTP/1.1 load generator in C (``openloop.c``), and its Python wrapper.

The benchmark's fixed-rate runs need a generator that keeps its schedule without taking a
core away from the gateway it measures. ``openloop.c`` is one thread on epoll: request i is
sent at t0 + i/rate on an idle keep-alive connection (a new one if none is idle, up to
``max_connections``; beyond that it queues), and its latency counts from that scheduled
time, so queueing is never hidden (no coordinated omission).

The C source ships in the package and is compiled on first use with ``$CC`` (else ``cc`` or
``gcc``) into ``$XDG_CACHE_HOME/ratelimit-gw/`` (default ``~/.cache/ratelimit-gw/``), under
a name holding a hash of the source, the compiler and the flags, so an edit recompiles.
:func:`available` says whether that can work; callers fall back to a Python generator if
not.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

__all__ = [
    "BuildError",
    "OpenLoopError",
    "OpenLoopResult",
    "available",
    "build",
    "compiler",
    "render_requests",
    "run",
]

CFLAGS = ("-O2", "-Wall", "-Wextra")
_SOURCE = "openloop.c"


class OpenLoopError(RuntimeError):
    """The generator could not be built or did not run to the end."""


class BuildError(OpenLoopError):
    """Compiling ``openloop.c`` failed (the message holds the compiler's output)."""


@dataclass(frozen=True)
class OpenLoopResult:
    sent: int  # requests sent (each scheduled request that got a connection in time)
    done: int  # complete responses, any status
    errors: int  # non-2xx, connection failures/resets, protocol errors, timeouts
    latencies_ms: list[float]  # sorted; one per complete response, from its scheduled time
    lateness_ms: list[float]  # sorted; one per sent request: send time - scheduled time
    detail: dict[str, str] = field(default_factory=dict)  # the DETAIL line's fields

    @property
    def cpu_s(self) -> float:
        """The generator's own CPU time (user + system), in seconds."""
        return (int(self.detail["cpu_user_us"]) + int(self.detail["cpu_sys_us"])) / 1e6


# --- building --------------------------------------------------------------------------------


def compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` if set (it may carry arguments), else cc or gcc."""
    configured = os.environ.get("CC", "").strip()
    if configured:
        argv = shlex.split(configured)
        found = shutil.which(argv[0])
        return [found, *argv[1:]] if found else None
    for name in ("cc", "gcc"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def available() -> bool:
    """Whether the generator can be used here (Linux, with a C compiler)."""
    return sys.platform.startswith("linux") and compiler() is not None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache"
    return root / "ratelimit-gw"


def _source() -> bytes:
    return resources.files(__name__).joinpath(_SOURCE).read_bytes()


def build(source: bytes | None = None) -> Path:
    """The compiled generator, compiling it first if this source is not in the cache yet."""
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler found: install cc/gcc or set CC")
    source = _source() if source is None else source
    digest = hashlib.sha256(b"\0".join([source, *(a.encode() for a in (*cc, *CFLAGS))]))
    target = cache_dir() / f"openloop-{digest.hexdigest()[:16]}"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a private directory next to the target, then rename: another process
    # never sees a half-written binary, and two concurrent builds both end well.
    with tempfile.TemporaryDirectory(prefix=".openloop-build-", dir=target.parent) as tmp:
        src, out = Path(tmp) / _SOURCE, Path(tmp) / "openloop"
        src.write_bytes(source)
        try:
            compiled = subprocess.run(
                [*cc, *CFLAGS, "-o", str(out), str(src)],
                capture_output=True,
                text=True,
                timeout=120,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            raise BuildError(f"could not run the C compiler {cc[0]}: {err}") from err
        if compiled.returncode != 0 or not out.is_file():
            raise BuildError(
                f"compiling {_SOURCE} with {shlex.join([*cc, *CFLAGS])} failed "
                f"(exit {compiled.returncode}):\n{compiled.stderr.strip()}"
            )
        os.replace(out, target)
    return target


# --- running ---------------------------------------------------------------------------------


def _check_header_text(what: str, value: str) -> None:
    if any(ch in value for ch in "\r\n\0"):
        raise ValueError(f"{what} must not contain CR, LF or NUL: {value!r}")


def render_requests(
    host: str,
    port: int,
    path: str,
    body: bytes,
    keys: list[str],
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """One raw POST per key (``Authorization: Bearer <key>``; none if no keys), NUL-separated."""
    if not path.startswith("/"):
        raise ValueError(f"path must start with '/': {path!r}")
    if b"\0" in body:
        raise ValueError("the body must not contain NUL bytes (they separate requests)")
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    common = [
        f"Host: {authority}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive",
    ]
    for name, value in (headers or {}).items():
        _check_header_text("header name", name)
        _check_header_text("header value", value)
        if ":" in name or not name.strip():
            raise ValueError(f"bad header name: {name!r}")
        common.append(f"{name}: {value}")
    blobs = []
    optional_keys: list[str | None] = [*keys] if keys else [None]
    for key in optional_keys:
        lines = [f"POST {path} HTTP/1.1", *common]
        if key is not None:
            _check_header_text("key", key)
            lines.append(f"Authorization: Bearer {key}")
        head = "\r\n".join([*lines, "", ""]).encode("latin-1")
        blobs.append(head + body)
    return b"\0".join(blobs)


def _read_us(path: Path) -> list[float]:
    values = array("I")
    if values.itemsize != 4:  # pragma: no cover - not on Linux
        raise OpenLoopError("array('I') is not 32 bits on this platform")
    values.frombytes(path.read_bytes())
    if sys.byteorder == "big":  # pragma: no cover - the files are little-endian
        values.byteswap()
    return sorted(v / 1000 for v in values)


def _fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)


def run(
    host: str,
    port: int,
    path: str,
    body: bytes,
    keys: list[str],
    rate: float,
    duration_s: float,
    ttfb: bool,
    connections: int = 32,
    *,
    max_connections: int = 256,
    timeout_s: float = 10.0,
    headers: Mapping[str, str] | None = None,
) -> OpenLoopResult:
    """Send ``int(rate * duration_s)`` POSTs at a fixed rate; see :class:`OpenLoopResult`.

    ``ttfb``: latency to the first body byte (the first chunk's data for chunked streams)
    instead of to the complete response; the whole response is read either way. A request
    not complete ``timeout_s`` after its scheduled time is an error.
    """
    if not rate > 0 or not duration_s >= 0:
        raise ValueError("need rate > 0 and duration_s >= 0")
    if max_connections < 1 or connections < 0 or not timeout_s > 0:
        raise ValueError("need max_connections >= 1, connections >= 0, timeout_s > 0")
    binary = build()
    count = int(rate * duration_s)
    requests = render_requests(host, port, path, body, keys, headers)
    with tempfile.TemporaryDirectory(prefix="rlgw-openloop-") as tmp:
        files = {name: Path(tmp) / name for name in ("requests", "latency", "lateness")}
        files["requests"].write_bytes(requests)
        argv = [
            str(binary),
            *("--host", host, "--port", str(port), "--requests", str(files["requests"])),
            *("--rate", repr(float(rate)), "--count", str(count)),
            *("--mode", "ttfb" if ttfb else "full", "--timeout", repr(float(timeout_s))),
            *("--connections", str(connections), "--max-connections", str(max_connections)),
            *("--latency-out", str(files["latency"]), "--lateness-out", str(files["lateness"])),
        ]
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=duration_s + timeout_s + 60,
            )
        except subprocess.TimeoutExpired as err:
            raise OpenLoopError(f"openloop did not finish in {err.timeout:.0f} s") from err
        lines = proc.stdout.splitlines()
        result = next((x for x in lines if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or result is None:
            output = "\n".join(x for x in (proc.stderr.strip(), proc.stdout.strip()) if x)
            raise OpenLoopError(f"openloop failed (exit {proc.returncode}): {output}")
        summary = _fields(result)
        detail = next((_fields(x) for x in lines if x.startswith("DETAIL ")), {})
        return OpenLoopResult(
            sent=int(summary["sent"]),
            done=int(summary["done"]),
            errors=int(summary["errors"]),
            latencies_ms=_read_us(files["latency"]),
            lateness_ms=_read_us(files["lateness"]),
            detail=detail,
        )
