"""`ratelimit-gw demo` as a new user meets it (the first hour): started from the shell, every
snippet its banner prints runs as printed — Python ones from a file and pasted into a REPL,
shell ones with bash — and prints a real answer; requests do not scroll the banner away and a
caller hanging up mid-stream prints no traceback.

The demo runs as a subprocess on a free port, as `make run` starts it; the snippets run with
no environment but PATH (no proxy settings, no variables the banner did not define)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from benchmarks.local_redis import free_port
from ratelimit_gw.demo import END_OF_SNIPPETS, SNIPPET_HEADER

from .cli_helpers import ROOT

pytestmark = pytest.mark.slow  # a demo process, and an SDK import per snippet

ANSWER = " ".join(f"tok{i}" for i in range(20))  # the mock's whole answer (mock_upstream)
CLEAN_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


@dataclass(frozen=True)
class PrintedSnippet:
    language: str
    title: str
    code: str


@dataclass(frozen=True)
class Demo:
    base: str
    key: str
    banner: str
    snippets: dict[str, PrintedSnippet]
    stdout: Path
    stderr: Path
    log_file: Path


def printed_snippets(banner: str) -> dict[str, PrintedSnippet]:
    """The snippets as a user sees them: from each header line to the next (or to the end
    line), without the blank lines around them."""
    found: dict[str, PrintedSnippet] = {}
    current: tuple[str, str] | None = None
    lines: list[str] = []

    def close() -> None:
        if current is not None:
            code = "\n".join(lines).strip("\n") + "\n"
            found[current[1]] = PrintedSnippet(current[0], current[1], code)

    for line in banner.splitlines():
        header = SNIPPET_HEADER.match(line)
        if header or line == END_OF_SNIPPETS:
            close()
            current, lines = (header[1], header[2]) if header else None, []
        elif current is not None:
            lines.append(line)
    return found


def wait_for_banner(process: subprocess.Popen[bytes], stdout: Path, stderr: Path) -> str:
    deadline = time.monotonic() + 60
    while END_OF_SNIPPETS not in (text := stdout.read_text()):
        assert process.poll() is None, f"the demo exited: {stderr.read_text()}"
        assert time.monotonic() < deadline, f"no banner after 60 s: {text}{stderr.read_text()}"
        time.sleep(0.1)
    return text


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    work = tmp_path_factory.mktemp("demo")
    stdout, stderr = work / "stdout", work / "stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "ratelimit_gw", "demo", "--port", str(free_port())],
            cwd=ROOT,  # this checkout's package comes first on the module path
            env={**CLEAN_ENV, "PYTHONPATH": str(ROOT)},
            stdout=out,
            stderr=err,
        )
    try:
        banner = wait_for_banner(process, stdout, stderr)
        base = re.search(r"^  OpenAI base URL +(http://\S+)/v1$", banner, re.MULTILINE)
        key = re.search(r"^  API key +(rlgw-\S+)$", banner, re.MULTILINE)
        log_file = re.search(r"^  Logs +(\S+)", banner, re.MULTILINE)
        assert base and key and log_file, banner
        yield Demo(
            base[1], key[1], banner, printed_snippets(banner), stdout, stderr, Path(log_file[1])
        )
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl+C
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def answered_json(output: str) -> list[Any]:
    """The JSON documents a shell snippet printed, one a line (skipping HTTP headers)."""
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def check_curl(output: str) -> None:
    assert output.startswith("HTTP/1.1 200"), output
    assert re.search(r"^x-ratelimit-limit-requests: 60\r?$", output, re.MULTILINE | re.I)
    chat, message, generated = answered_json(output)
    assert chat["choices"][0]["message"]["content"] == ANSWER
    assert message["content"][0]["text"] == ANSWER
    assert generated["candidates"][0]["content"]["parts"][0]["text"] == ANSWER


def check_admin(output: str) -> None:
    account, topup, keys = answered_json(output)
    assert (account["id"], account["prepaid"]) == ("demo", True)
    assert topup["account"]["id"] == "demo"
    assert topup["credited"] in (True, False)  # credited once, whichever test ran it first
    assert [k["account"] for k in keys["data"]] == ["demo"]


def check_answer(output: str) -> None:
    assert output == ANSWER + "\n"


CHECKS: dict[str, Callable[[str], None]] = {
    "curl, one call in each protocol (the first with its x-ratelimit-* headers)": check_curl,
    "OpenAI SDK": check_answer,
    "Anthropic SDK": check_answer,
    "Anthropic SDK, streaming": check_answer,
    "Google Gen AI SDK": check_answer,
    "admin API: the account, a top-up (credited once per key), its keys": check_admin,
}
PYTHON = [title for title in CHECKS if not title.startswith(("curl", "admin"))]
# What pasting into Python's interactive prompt does: one line at a time, each compound
# statement ended by a blank line (a REPL refuses a statement right after an indented block).
REPL = """\
import code, sys
console = code.InteractiveConsole()
for line in sys.stdin.read().splitlines():
    console.push(line)
console.push("")
"""


def run(
    command: list[str], cwd: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, env=CLEAN_ENV, input=stdin, capture_output=True, text=True, timeout=60
    )


def test_the_banner_prints_each_snippet_once(demo: Demo) -> None:
    assert list(demo.snippets) == list(CHECKS)
    for snippet in demo.snippets.values():
        # Pasted as is: nothing indented but the body of a block.
        assert not snippet.code.startswith((" ", "\t")), snippet.title
        assert snippet.language == ("python" if snippet.title in PYTHON else "shell")


@pytest.mark.parametrize("title", CHECKS)
def test_each_snippet_runs_as_printed_from_a_file(demo: Demo, title: str, tmp_path: Path) -> None:
    snippet = demo.snippets[title]
    if snippet.language == "python":
        path = tmp_path / "snippet.py"
        command = [sys.executable, str(path)]
    else:
        path = tmp_path / "snippet.sh"
        command = ["bash", "-eu", str(path)]  # -u: a variable the snippet did not set fails
    path.write_text(snippet.code)
    done = run(command, tmp_path)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    CHECKS[title](done.stdout)


@pytest.mark.parametrize("title", PYTHON)
def test_each_python_snippet_runs_pasted_into_a_repl(
    demo: Demo, title: str, tmp_path: Path
) -> None:
    done = run([sys.executable, "-c", REPL], tmp_path, stdin=demo.snippets[title].code)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    check_answer(done.stdout)


async def test_requests_and_hang_ups_leave_the_banner_alone(demo: Demo) -> None:
    """Request logs go to the file the banner names, not over the banner; a caller hanging
    up mid-stream (the gateway then drops its upstream call) prints no traceback."""
    headers = {"x-api-key": demo.key, "anthropic-version": "2023-06-01"}
    body = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "Hello"}],
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{demo.base}/v1/messages", json=body, headers=headers) as whole:
            assert whole.status == 200
            assert ANSWER.split()[-1] in (await whole.read()).decode()
        # 4 chunks 300 ms apart: the caller leaves after the first.
        slow = {**headers, "x-mock-chunk-delay-ms": "300"}
        left = await http.post(f"{demo.base}/v1/messages", json=body, headers=slow)
        assert "message_start" in (await left.content.readany()).decode()
        left.close()
    deadline = time.monotonic() + 10
    while not any(entry["status"] == 499 for entry in access_log(demo.log_file)):
        assert time.monotonic() < deadline, demo.log_file.read_text()
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # the mock's next write, 300 ms on, finds the connection gone
    assert demo.stdout.read_text() == demo.banner
    assert demo.stderr.read_text() == ""
    assert "Traceback" not in demo.log_file.read_text()
    assert [e["status"] for e in access_log(demo.log_file) if e["path"] == "/v1/messages"][-2:] == [
        200,
        499,
    ]


def access_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
