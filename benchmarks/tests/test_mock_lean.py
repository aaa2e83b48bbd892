"""The benchmark's lean mock answers byte for byte like the full mock, over real sockets."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest

from benchmarks.mock_lean import serve_lean
from ratelimit_gw.testing.mock_upstream import MockSettings, start_mock_upstream

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = MockSettings(chunks=3, tokens_per_chunk=4)
MESSAGES = [{"role": "user", "content": "Count to twenty, slowly."}]
BODIES = {
    "plain": {"model": "gpt-4o-mini", "messages": MESSAGES},
    "capped": {"model": "gpt-4o-mini", "max_completion_tokens": 5, "messages": MESSAGES},
    "stream": {"model": "gpt-4o-mini", "stream": True, "messages": MESSAGES},
    "stream with usage": {
        "model": "gpt-4o-mini",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 7,
        "messages": MESSAGES,
    },
}


@pytest.fixture
async def both() -> AsyncIterator[tuple[str, str]]:
    """(full mock URL, lean mock URL), with the same settings."""
    runner, full_url = await start_mock_upstream("127.0.0.1", 0, SETTINGS)
    server = await serve_lean("127.0.0.1", 0, SETTINGS)
    port = server.sockets[0].getsockname()[1]
    try:
        yield full_url, f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()
        await runner.cleanup()


def _normalised(body: bytes) -> bytes:
    """Ids count requests per server and ``created`` is the clock: the rest must match."""
    body = re.sub(rb"chatcmpl-mock\d+", b"chatcmpl-mockN", body)
    return re.sub(rb'"created":\d+', b'"created":0', body)


@pytest.mark.parametrize("name", sorted(BODIES))
async def test_answers_match_the_full_mock(both: tuple[str, str], name: str) -> None:
    answers = []
    async with aiohttp.ClientSession() as http:
        for base in both:
            async with http.post(f"{base}/v1/chat/completions", json=BODIES[name]) as resp:
                assert resp.status == 200
                answers.append((resp.headers["Content-Type"], await resp.read()))
    (full_type, full_body), (lean_type, lean_body) = answers
    assert lean_type.split(";")[0] == full_type.split(";")[0]
    assert _normalised(lean_body) == _normalised(full_body)
    assert b"tok0" in lean_body


async def test_the_openai_sdk_reads_usage_from_it(both: tuple[str, str]) -> None:
    async with openai.AsyncOpenAI(base_url=f"{both[1]}/v1", api_key="x", max_retries=0) as oai:
        plain = await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
        assert plain.usage is not None
        # 24 prompt chars -> 6 input tokens; 3 chunks x 4 tokens of output.
        assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (6, 12)
        stream = await oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " ".join(f"tok{i}" for i in range(12))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


async def test_pipelined_requests_are_answered_in_order(both: tuple[str, str]) -> None:
    port = int(both[1].rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    requests = b""
    for cap in (1, 2):
        body = json.dumps({"model": "m", "max_tokens": cap, "messages": MESSAGES}).encode()
        requests += (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
    writer.write(requests)
    caps = []
    for _ in range(2):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        caps.append(json.loads(await reader.readexactly(length))["usage"]["completion_tokens"])
    assert caps == [1, 2]
    # Connection: close is honoured: the answer comes, then the end of the stream.
    body = json.dumps({"model": "m", "messages": MESSAGES}).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    rest = await asyncio.wait_for(reader.read(), 5)
    assert rest.startswith(b"HTTP/1.1 200 OK") and b"tok0" in rest
    writer.close()


async def test_anything_else_is_a_typed_openai_error(both: tuple[str, str]) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{both[1]}/v1/messages", json=BODIES["plain"]) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
        async with http.get(f"{both[1]}/v1/chat/completions") as resp:
            assert resp.status == 404
        async with http.post(f"{both[1]}/v1/chat/completions", data=b"{not json") as resp:
            assert resp.status == 400
            assert "not valid JSON" in (await resp.json())["error"]["message"]
        async with http.post(f"{both[1]}/v1/chat/completions", json=[1, 2]) as resp:
            assert resp.status == 400


@pytest.mark.slow  # runs the CLI as a subprocess
def test_the_cli_refuses_latency_it_cannot_add() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.mock_lean", "--latency-ms", "5"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert run.returncode != 0
    assert "unrecognized arguments: --latency-ms" in run.stderr
