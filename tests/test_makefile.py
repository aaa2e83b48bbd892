"""What `make test` may install outside the repository (README, Quick start): as root with
apt-get it installs a missing test tool from the system packages; ``SYSTEM_INSTALL=no``
installs nothing. Run against a PATH where the tool is missing and apt-get is a stand-in
that only records its calls."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .cli_helpers import ROOT


def make_wrk(tmp_path: Path, *make_args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """``make wrk`` with no wrk on PATH; returns the run and the arguments apt-get got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "apt-get.calls"
    calls.touch()
    apt_get = bin_dir / "apt-get"
    apt_get.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexit 1\n')
    apt_get.chmod(0o755)
    # The Makefile asks `id -u` whether it runs as root; the stand-in says it does, so the
    # install branch is exercised whoever runs the tests (apt-get above only records).
    fake_id = bin_dir / "id"
    fake_id.write_text("#!/bin/sh\necho 0\n")
    fake_id.chmod(0o755)
    done = subprocess.run(
        [shutil.which("make") or "make", "--no-print-directory", "wrk", *make_args],
        cwd=ROOT,
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done, calls.read_text()


def test_system_install_no_installs_nothing(tmp_path: Path) -> None:
    done, apt_calls = make_wrk(tmp_path, "SYSTEM_INSTALL=no")
    assert done.returncode == 0, done.stderr
    assert apt_calls == ""
    assert done.stdout == "no wrk: install it (Debian: apt-get install wrk)\n"


def test_as_root_a_missing_tool_comes_from_the_system_packages(tmp_path: Path) -> None:
    done, apt_calls = make_wrk(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "install -y -qq wrk" in apt_calls
