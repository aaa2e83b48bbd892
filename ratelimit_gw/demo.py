"""`ratelimit-gw demo`: a mock upstream and a gateway on memory://, ready to call."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from aiohttp import web

from .accounts import AccountStore
from .app import create_app
from .limits import Limits
from .serve import make_runner
from .settings import build_settings
from .storage import open_storage
from .testing.mock_upstream import MockSettings, start_mock_upstream

DEMO_MODELS = (
    ("gpt-4o-mini", "openai", 0.15, 0.60),
    ("claude-sonnet-4-6", "anthropic", 3.00, 15.00),
    ("gemini-2.5-flash", "gemini", 0.30, 2.50),
)
DEMO_ACCOUNT = "demo"


def demo_config(upstream_url: str, host: str, port: int) -> dict[str, Any]:
    return {
        "server": {"host": host, "port": port},
        "storage": {"url": "memory://"},
        "providers": [
            {"name": f"mock-{protocol}", "protocol": protocol, "base_url": upstream_url}
            for protocol in ("openai", "anthropic", "gemini")
        ],
        "models": [
            {
                "id": model,
                "provider": f"mock-{protocol}",
                "input_per_mtok": str(inp),
                "output_per_mtok": str(out),
                "default_max_output": 1024,
            }
            for model, protocol, inp, out in DEMO_MODELS
        ],
    }


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def instructions(base: str, key: str) -> str:
    return f"""
ratelimit-gw demo is running (storage: memory://, upstream: a local mock).

  OpenAI base URL     {base}/v1
  Anthropic base URL  {base}
  Gemini base URL     {base}
  API key             {key}
  Account "{DEMO_ACCOUNT}": balance $5.00, 60 requests/min, 20000 tokens/min, 4 in flight

curl (OpenAI):
  curl -s {base}/v1/chat/completions -H "Authorization: Bearer {key}" \\
    -H 'content-type: application/json' \\
    -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"Hello"}}],"max_tokens":50}}' -i
curl (Anthropic):
  curl -s {base}/v1/messages -H "x-api-key: {key}" -H 'anthropic-version: 2023-06-01' \\
    -H 'content-type: application/json' \\
    -d '{{"model":"claude-sonnet-4-6","max_tokens":50,"messages":[{{"role":"user","content":"Hello"}}]}}' -i
curl (Gemini):
  curl -s '{base}/v1beta/models/gemini-2.5-flash:generateContent' -H "x-goog-api-key: {key}" \\
    -H 'content-type: application/json' -d '{{"contents":[{{"parts":[{{"text":"Hello"}}]}}]}}' -i

Python (pip install openai anthropic google-genai):
  from openai import OpenAI
  OpenAI(base_url="{base}/v1", api_key="{key}").chat.completions.create(
      model="gpt-4o-mini", messages=[{{"role": "user", "content": "Hello"}}], max_tokens=50)

  import anthropic
  anthropic.Anthropic(base_url="{base}", api_key="{key}").messages.create(
      model="claude-sonnet-4-6", max_tokens=50, messages=[{{"role": "user", "content": "Hello"}}])

  from google import genai
  genai.Client(api_key="{key}", http_options={{"base_url": "{base}"}}).models.generate_content(
      model="gemini-2.5-flash", contents="Hello")

Press Ctrl+C to stop.
"""


async def run_demo(host: str, port: int) -> None:
    mock_runner, upstream_url = await start_mock_upstream(
        "127.0.0.1", 0, MockSettings(chunk_delay_ms=20)
    )
    if not _port_free(host, port):
        print(f"port {port} is busy; picking a free one")
        port = 0
    settings = build_settings(demo_config(upstream_url, host, port), os.environ)
    storage = open_storage(settings.storage)
    accounts = AccountStore(storage)
    await accounts.create_account(
        DEMO_ACCOUNT,
        balance_nano=5_000_000_000,
        limits=Limits(rpm=60, tpm=20_000, concurrency=4),
    )
    created = await accounts.create_key(DEMO_ACCOUNT, name="demo key")
    runner = make_runner(create_app(settings, storage), settings.server)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    print(instructions(f"http://{host}:{bound_port}", created.key), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await mock_runner.cleanup()
        await storage.close()
