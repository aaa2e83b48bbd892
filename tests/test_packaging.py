"""The wheel ships the product (the Lua scripts and the mock upstream, not the benchmark),
and the scripts load the same way as from a checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds and installs the wheel

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "ratelimit_gw" / "lua").glob("*.lua"))

PROBE = """
import asyncio, pathlib, sys
import ratelimit_gw
from ratelimit_gw.settings import StorageSettings
from ratelimit_gw.storage import open_storage
from ratelimit_gw.storage.scripts import SCRIPT_NAMES, load_script
from ratelimit_gw.accounts import AccountStore

async def main():
    storage = open_storage(StorageSettings(url="memory://"))
    account = await AccountStore(storage).create_account("probe", balance_nano=10)
    await storage.close()
    return account.balance_usd

print(pathlib.Path(ratelimit_gw.__file__).parent)
print(sorted(name + ".lua" for name in SCRIPT_NAMES if load_script(name)))
print(asyncio.run(main()))
"""


def test_every_lua_script_is_registered() -> None:
    from ratelimit_gw.storage.scripts import SCRIPT_NAMES

    assert sorted(f"{name}.lua" for name in SCRIPT_NAMES) == SCRIPTS


def test_wheel_ships_the_product_and_loads_the_lua_scripts(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("ratelimit_gw-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = sorted(
            Path(n).name for n in archive.namelist() if n.startswith("ratelimit_gw/lua/")
        )
        assert shipped == SCRIPTS
        # The product only: the mock upstream (demo, users) ships; the benchmark does not.
        names = set(archive.namelist())
        assert "ratelimit_gw/testing/mock_upstream.py" in names
        assert not [n for n in names if n.startswith("benchmarks/") or "openloop" in n]
        site = tmp_path / "site"
        archive.extractall(site)

    # Import from the unpacked wheel, not the checkout: PYTHONPATH wins over the editable
    # install's finder, and the working directory is outside the checkout.
    probe = subprocess.run(
        [sys.executable, "-c", PROBE],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    package_dir, scripts, balance = probe.stdout.splitlines()
    assert Path(package_dir) == site / "ratelimit_gw"
    assert scripts == str(SCRIPTS)
    assert balance == "0.00000001"
