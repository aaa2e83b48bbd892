"""`ratelimit-gw demo`: a mock upstream and a gateway on memory://, ready to call."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
import tempfile
from pathlib import Path
from typing import Any, Literal

import msgspec
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


class Snippet(msgspec.Struct, frozen=True, kw_only=True):
    """One runnable example of the banner: pasted as printed into a shell (``shell``) or a
    Python file or REPL (``python``), it calls the demo and prints the answer."""

    language: Literal["shell", "python"]
    title: str
    code: str


# Marks where a snippet starts in the banner: "--- python: OpenAI SDK ---".
SNIPPET_HEADER = re.compile(r"^--- (shell|python): (.+) ---$")
END_OF_SNIPPETS = "Press Ctrl+C to stop."
_HELLO_OPENAI = (
    '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}],"max_tokens":50}'
)
_HELLO_ANTHROPIC = (
    '{"model":"claude-sonnet-4-6","max_tokens":50,"messages":[{"role":"user","content":"Hello"}]}'
)
_HELLO_GEMINI = '{"contents":[{"parts":[{"text":"Hello"}]}]}'
_PY_HELLO = '[{"role": "user", "content": "Hello"}]'


def snippets(base: str, key: str, admin_token: str) -> list[Snippet]:
    """The banner's examples for a demo on ``base``; each defines every value it uses, and a
    REPL paste ends each compound statement with a blank line."""
    json = "-H 'content-type: application/json'"
    return [
        Snippet(
            language="shell",
            title="curl, one call in each protocol (the first with its x-ratelimit-* headers)",
            code=f"""export RLGW_URL={base}
export RLGW_KEY={key}
curl -s -i "$RLGW_URL/v1/chat/completions" -H "Authorization: Bearer $RLGW_KEY" {json} \\
  -d '{_HELLO_OPENAI}'; echo
curl -s "$RLGW_URL/v1/messages" -H "x-api-key: $RLGW_KEY" -H 'anthropic-version: 2023-06-01' \\
  {json} -d '{_HELLO_ANTHROPIC}'; echo
curl -s "$RLGW_URL/v1beta/models/gemini-2.5-flash:generateContent" -H "x-goog-api-key: $RLGW_KEY" \\
  {json} -d '{_HELLO_GEMINI}'; echo""",
        ),
        Snippet(
            language="python",
            title="OpenAI SDK",
            code=f"""from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="{key}")
reply = client.chat.completions.create(model="gpt-4o-mini", messages={_PY_HELLO}, max_tokens=50)
print(reply.choices[0].message.content)""",
        ),
        Snippet(
            language="python",
            title="Anthropic SDK",
            code=f"""import anthropic
client = anthropic.Anthropic(base_url="{base}", api_key="{key}")
message = client.messages.create(model="claude-sonnet-4-6", max_tokens=50, messages={_PY_HELLO})
print(message.content[0].text)""",
        ),
        Snippet(
            language="python",
            title="Anthropic SDK, streaming",
            code=f"""import anthropic
client = anthropic.Anthropic(base_url="{base}", api_key="{key}")
with client.messages.stream(model="claude-sonnet-4-6", max_tokens=50, messages={_PY_HELLO}) as stream:
    for text in stream.text_stream:
        print(text, end="", flush=True)

print()""",
        ),
        Snippet(
            language="python",
            # The client stays in a variable: the SDK closes a client that is collected,
            # and with it the call made through it.
            title="Google Gen AI SDK",
            code=f"""from google import genai
client = genai.Client(api_key="{key}", http_options={{"base_url": "{base}"}})
response = client.models.generate_content(model="gemini-2.5-flash", contents="Hello")
print(response.text)""",
        ),
        Snippet(
            language="shell",
            title="admin API: the account, a top-up (credited once per key), its keys",
            code=f"""export RLGW_URL={base}
export RLGW_ADMIN_TOKEN={admin_token}
curl -s "$RLGW_URL/admin/accounts/{DEMO_ACCOUNT}" -H "Authorization: Bearer $RLGW_ADMIN_TOKEN"; echo
curl -s "$RLGW_URL/admin/accounts/{DEMO_ACCOUNT}/topup" -H "Authorization: Bearer $RLGW_ADMIN_TOKEN" \\
  -d '{{"amount_usd": "1.00", "idempotency_key": "demo-topup-1"}}'; echo
curl -s "$RLGW_URL/admin/keys?account={DEMO_ACCOUNT}" -H "Authorization: Bearer $RLGW_ADMIN_TOKEN"; echo""",
        ),
    ]


def instructions(base: str, key: str, admin_token: str, log_file: Path) -> str:
    examples = "\n\n".join(
        f"--- {s.language}: {s.title} ---\n{s.code}" for s in snippets(base, key, admin_token)
    )
    return f"""
ratelimit-gw demo is running: a gateway on memory:// storage, in front of a local mock upstream.

  OpenAI base URL          {base}/v1
  Anthropic, Gemini URL    {base}
  API key                  {key}
  Account "{DEMO_ACCOUNT}"           balance $5.00, 60 requests/min, 20000 tokens/min, 4 in flight
  Admin token              {admin_token}  (admin API: docs/admin.md)
  Logs                     {log_file}  (one JSON line per request)

Each snippet below runs as printed: paste it into a shell, or into a Python file or REPL
(pip install openai anthropic google-genai).

{examples}

{END_OF_SNIPPETS}
"""


def _log_to_file(path: Path) -> None:
    """Request logs would scroll the banner away: every log line goes to ``path`` (in the
    format the terminal would show), and only warnings and errors still reach the terminal."""
    for logger in (logging.getLogger(), logging.getLogger("ratelimit_gw.access")):
        for handler in list(logger.handlers):
            to_file = logging.FileHandler(path, encoding="utf-8")
            to_file.setFormatter(handler.formatter)
            handler.setLevel(logging.WARNING)
            logger.addHandler(to_file)


async def run_demo(host: str, port: int) -> None:
    mock_runner, upstream_url = await start_mock_upstream(
        "127.0.0.1", 0, MockSettings(chunk_delay_ms=20)
    )
    if not _port_free(host, port):
        print(f"port {port} is busy; picking a free one")
        port = 0
    log_file = Path(tempfile.mkdtemp(prefix="ratelimit-gw-demo-")) / "gateway.log"
    _log_to_file(log_file)
    # The admin API is on only with a token; the demo makes one and prints it.
    admin_token = "demo-" + secrets.token_urlsafe(16)
    environ = {**os.environ, "RLGW_ADMIN_TOKEN": admin_token}
    settings = build_settings(demo_config(upstream_url, host, port), environ)
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
    base = f"http://{host}:{bound_port}"
    print(instructions(base, created.key, admin_token, log_file), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await mock_runner.cleanup()
        await storage.close()
