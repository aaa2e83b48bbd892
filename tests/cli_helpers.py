"""The `ratelimit-gw` CLI as a subprocess, the way an operator runs it (its own process:
main() installs a loop policy). The account and key commands need the ``redis_url``
fixture (conftest): they refuse ``memory://``, which lives inside one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """This checkout's package (the working directory comes first on the module path), with
    none of the test's environment but ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "ratelimit_gw", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


AUDIT_LOGGER = " ratelimit_gw.audit "


def audit_lines(stderr: str) -> list[dict[str, Any]]:
    """The audit lines a command wrote on stderr (the changes it made), parsed; stderr may
    hold nothing else."""
    lines = []
    for line in stderr.splitlines():
        assert AUDIT_LOGGER in line, line
        lines.append(json.loads(line.split(AUDIT_LOGGER, 1)[1]))
    return lines


def cli_json(*args: str) -> Any:
    done = cli(*args, "--json")
    assert done.returncode == 0, done.stderr
    audit_lines(done.stderr)
    return json.loads(done.stdout)


def cli_text(*args: str) -> dict[str, str]:
    """A one-record text answer: "name  value" lines → {name: value}."""
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    audit_lines(done.stderr)
    rows = [line.split(None, 1) for line in done.stdout.splitlines() if line]
    return {row[0]: row[1] if len(row) > 1 else "" for row in rows}
