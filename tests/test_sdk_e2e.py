"""The official SDKs (openai, anthropic, google-genai), unmodified, against the gateway (§1).

Every test takes the ``gateway`` fixture, so it runs on ``memory://`` and on a real Redis.
Plain and streaming calls check the text and the mock's exact usage numbers; the rate-limit
tests check what each SDK raises and that the SDKs' built-in retries wait exactly what the
gateway's ``retry-after-ms`` said (observed through httpx event hooks, not assumed), and do
not retry at all when the gateway says waiting cannot help (``x-should-retry: false``).

Mock usage (mock_upstream docstring): input = max(1, ceil(prompt chars / 4)), output = 20
words ("tok0 … tok19") cut at the request's cap.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anthropic
import httpx2
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from ratelimit_gw.accounts import LedgerEntry

from .conftest import UPSTREAM_KEY, Gateway

SYSTEM = "You are terse."
USER = "Say something please."
PROMPT_TOKENS = 9  # 14 + 21 = 35 prompt chars -> ceil(35 / 4)
USER_TOKENS = 6  # 21 chars
FULL_TEXT = " ".join(f"tok{i}" for i in range(20))
PIECES = ["tok0 tok1 tok2 tok3 tok4", " tok5 tok6 tok7 tok8 tok9"]
ALL_MODELS = ["claude-sonnet-4-6", "gemini-2.5-flash", "gpt-4o", "gpt-4o-mini"]

CHAT_MESSAGES: Any = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
CLAUDE_MESSAGES: Any = [{"role": "user", "content": USER}]
GEMINI_CONFIG = genai_types.GenerateContentConfig(system_instruction=SYSTEM)


# --- what the SDKs put on the wire ------------------------------------------------------------


@dataclass
class Attempt:
    """One HTTP attempt an SDK made: when it left, when its response headers arrived."""

    sent: float
    retry_count: str | None
    body: bytes = b""  # the request body as sent
    received: float = math.nan
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    error: dict[str, Any] | None = None  # the decoded body of an error response


class AttemptLog:
    """httpx event hooks that record every attempt (retries included) with its timing."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []

    async def on_request(self, request: httpx2.Request) -> None:
        retry_count = request.headers.get("x-stainless-retry-count")
        self.attempts.append(
            Attempt(sent=time.monotonic(), retry_count=retry_count, body=request.content)
        )

    async def on_response(self, response: httpx2.Response) -> None:
        attempt = self.attempts[-1]
        attempt.received = time.monotonic()
        attempt.status = response.status_code
        attempt.headers = {k.lower(): v for k, v in response.headers.items()}
        if response.status_code >= 400:  # never read a 200: it may be a stream
            await response.aread()
            attempt.error = response.json()

    def hooks(self) -> dict[str, list[Any]]:
        return {"request": [self.on_request], "response": [self.on_response]}


@asynccontextmanager
async def openai_client(
    gw: Gateway,
    key: str,
    *,
    max_retries: int = 0,
    log: AttemptLog | None = None,
    base_path: str = "/v1",  # the converter route's is /openai/v1
) -> AsyncIterator[openai.AsyncOpenAI]:
    hooks = (log or AttemptLog()).hooks()
    async with (
        openai.DefaultAsyncHttpxClient(event_hooks=hooks) as http,
        openai.AsyncOpenAI(
            base_url=gw.url + base_path, api_key=key, max_retries=max_retries, http_client=http
        ) as client,
    ):
        yield client


@asynccontextmanager
async def anthropic_client(
    gw: Gateway,
    key: str,
    *,
    max_retries: int = 0,
    log: AttemptLog | None = None,
    base_path: str = "",  # the converter route's is /anthropic
) -> AsyncIterator[anthropic.AsyncAnthropic]:
    hooks = (log or AttemptLog()).hooks()
    async with (
        anthropic.DefaultAsyncHttpxClient(event_hooks=hooks) as http,
        anthropic.AsyncAnthropic(
            base_url=gw.url + base_path, api_key=key, max_retries=max_retries, http_client=http
        ) as client,
    ):
        yield client


@asynccontextmanager
async def gemini_client(
    gw: Gateway,
    key: str,
    *,
    base_path: str = "",  # the converter route's is /gemini
    trace_configs: list[aiohttp.TraceConfig] | None = None,
) -> AsyncIterator[genai.client.AsyncClient]:
    # google-genai's own aiohttp session subclass triggers a DeprecationWarning: hand it ours.
    async with aiohttp.ClientSession(trace_configs=trace_configs) as session:
        options = genai_types.HttpOptions(base_url=gw.url + base_path, aiohttp_client=session)
        client = genai.Client(api_key=key, http_options=options)
        try:
            yield client.aio
        finally:
            await client.aio.aclose()
            client.close()


async def settled(gw: Gateway, account: str, count: int) -> list[LedgerEntry]:
    """Wait until the account's ledger holds ``count`` entries (settlement runs in background)."""
    deadline = time.monotonic() + 5
    while True:
        entries = await gw.accounts.ledger(account)
        if len(entries) >= count or time.monotonic() > deadline:
            return entries
        await asyncio.sleep(0.005)


def forwarded_credential(gw: Gateway) -> tuple[str | None, str | None, str | None]:
    headers = gw.upstream.state.requests[-1].headers
    return headers.get("authorization"), headers.get("x-api-key"), headers.get("x-goog-api-key")


# --- OpenAI -----------------------------------------------------------------------------------


async def test_openai_chat_plain_returns_mock_text_and_usage(gateway: Gateway) -> None:
    key = await gateway.new_key()
    async with openai_client(gateway, key) as client:
        resp = await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT_MESSAGES)
    assert resp.choices[0].message.content == FULL_TEXT
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (PROMPT_TOKENS, 20)
    assert resp.usage.total_tokens == PROMPT_TOKENS + 20
    # The provider saw the gateway's upstream credential, never the caller's key.
    assert forwarded_credential(gateway)[0] == f"Bearer {UPSTREAM_KEY}"
    [entry] = await settled(gateway, "acme", 1)
    assert (entry.input_tokens, entry.output_tokens) == (PROMPT_TOKENS, 20)


async def test_openai_chat_stream_without_include_usage_shows_no_usage_chunk(
    gateway: Gateway,
) -> None:
    key = await gateway.new_key()
    async with openai_client(gateway, key) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=CHAT_MESSAGES, stream=True
        )
        chunks = [c async for c in stream]
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)
    assert len(chunks) == 1 + 4 + 1  # role chunk, 4 text chunks, finish chunk
    deltas = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert deltas[:2] == PIECES
    assert "".join(deltas) == FULL_TEXT
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The gateway asked upstream for usage and hid that chunk, yet still metered it.
    upstream_body = gateway.upstream.state.requests[-1].json()
    assert upstream_body["stream_options"] == {"include_usage": True}
    [entry] = await settled(gateway, "acme", 1)
    assert (entry.input_tokens, entry.output_tokens) == (PROMPT_TOKENS, 20)


async def test_openai_chat_stream_with_include_usage_ends_with_mock_usage(
    gateway: Gateway,
) -> None:
    key = await gateway.new_key()
    async with openai_client(gateway, key) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=CHAT_MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    *body, last = chunks
    assert all(c.usage is None and len(c.choices) == 1 for c in body)
    assert "".join(c.choices[0].delta.content or "" for c in body) == FULL_TEXT
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (PROMPT_TOKENS, 20)
    assert last.usage.total_tokens == PROMPT_TOKENS + 20


async def test_openai_responses_plain_returns_mock_usage(gateway: Gateway) -> None:
    key = await gateway.new_key()
    async with openai_client(gateway, key) as client:
        resp = await client.responses.create(model="gpt-4o", instructions=SYSTEM, input=USER)
    assert resp.status == "completed"
    assert resp.output_text == FULL_TEXT
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (PROMPT_TOKENS, 20)
    assert resp.usage.total_tokens == PROMPT_TOKENS + 20
    assert gateway.upstream.state.requests[-1].path == "/v1/responses"


async def test_openai_responses_stream_final_event_carries_usage(gateway: Gateway) -> None:
    key = await gateway.new_key()
    async with openai_client(gateway, key) as client:
        stream = await client.responses.create(
            model="gpt-4o", instructions=SYSTEM, input=USER, stream=True
        )
        events = [e async for e in stream]
        async with client.responses.stream(model="gpt-4o", input=USER) as helper:
            deltas = [e.delta async for e in helper if e.type == "response.output_text.delta"]
            final = await helper.get_final_response()
    assert events[0].type == "response.created"
    last = events[-1]
    assert last.type == "response.completed"
    assert last.response.output_text == FULL_TEXT
    assert last.response.usage is not None
    assert (last.response.usage.input_tokens, last.response.usage.output_tokens) == (
        PROMPT_TOKENS,
        20,
    )
    # The SDK's accumulating helper rebuilds the same answer from the relayed deltas.
    assert deltas[:2] == PIECES and final.output_text == FULL_TEXT
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (USER_TOKENS, 20)


async def test_openai_models_list_shows_only_models_the_key_may_use(gateway: Gateway) -> None:
    everything = await gateway.new_key()
    restricted = await gateway.new_key(create_account=False, models=["gpt-4o*"])
    async with openai_client(gateway, everything) as client:
        all_ids = [m.id async for m in client.models.list()]
    async with openai_client(gateway, restricted) as client:
        page = await client.models.list()
        models = page.data
    assert all_ids == ALL_MODELS
    assert [m.id for m in models] == ["gpt-4o", "gpt-4o-mini"]
    assert all(m.object == "model" and m.owned_by == "mock-openai" for m in models)


# --- Anthropic --------------------------------------------------------------------------------


async def test_anthropic_messages_plain_returns_mock_usage(gateway: Gateway) -> None:
    key = await gateway.new_key()
    async with anthropic_client(gateway, key) as client:
        msg = await client.messages.create(
            model="claude-sonnet-4-6", system=SYSTEM, messages=CLAUDE_MESSAGES, max_tokens=100
        )
    assert msg.content[0].type == "text" and msg.content[0].text == FULL_TEXT
    assert msg.stop_reason == "end_turn"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (PROMPT_TOKENS, 20)
    assert forwarded_credential(gateway)[1] == UPSTREAM_KEY
    [entry] = await settled(gateway, "acme", 1)
    assert (entry.input_tokens, entry.output_tokens) == (PROMPT_TOKENS, 20)


async def test_anthropic_messages_stream_final_message_usage(gateway: Gateway) -> None:
    key = await gateway.new_key()
    async with (
        anthropic_client(gateway, key) as client,
        client.messages.stream(
            model="claude-sonnet-4-6", system=SYSTEM, messages=CLAUDE_MESSAGES, max_tokens=100
        ) as stream,
    ):
        texts = [t async for t in stream.text_stream]
        msg = await stream.get_final_message()
    assert texts[:2] == PIECES and "".join(texts) == FULL_TEXT
    assert msg.stop_reason == "end_turn"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (PROMPT_TOKENS, 20)
    [entry] = await settled(gateway, "acme", 1)
    assert (entry.input_tokens, entry.output_tokens) == (PROMPT_TOKENS, 20)


async def test_anthropic_models_list_shows_only_models_the_key_may_use(gateway: Gateway) -> None:
    everything = await gateway.new_key()
    restricted = await gateway.new_key(create_account=False, models=["claude-*", "gpt-4o"])
    async with anthropic_client(gateway, everything) as client:
        all_ids = [m.id async for m in client.models.list()]
    async with anthropic_client(gateway, restricted) as client:
        models = [m async for m in client.models.list()]
    assert all_ids == ALL_MODELS
    assert [m.id for m in models] == ["claude-sonnet-4-6", "gpt-4o"]
    assert all(m.type == "model" and m.display_name for m in models)


# --- Gemini (google-genai, async client) ------------------------------------------------------


async def test_gemini_generate_content_returns_mock_usage(gateway: Gateway) -> None:
    key = await gateway.new_key()
    async with gemini_client(gateway, key) as client:
        resp = await client.models.generate_content(
            model="gemini-2.5-flash", contents=USER, config=GEMINI_CONFIG
        )
    assert resp.text == FULL_TEXT
    usage = resp.usage_metadata
    assert usage is not None
    assert (usage.prompt_token_count, usage.candidates_token_count) == (PROMPT_TOKENS, 20)
    assert usage.total_token_count == PROMPT_TOKENS + 20
    assert forwarded_credential(gateway)[2] == UPSTREAM_KEY
    [entry] = await settled(gateway, "acme", 1)
    assert (entry.input_tokens, entry.output_tokens) == (PROMPT_TOKENS, 20)


async def test_gemini_stream_usage_metadata_totals(gateway: Gateway) -> None:
    key = await gateway.new_key()
    async with gemini_client(gateway, key) as client:
        stream = await client.models.generate_content_stream(
            model="gemini-2.5-flash", contents=USER, config=GEMINI_CONFIG
        )
        chunks = [c async for c in stream]
    assert [c.text for c in chunks][:2] == PIECES
    assert "".join(c.text or "" for c in chunks) == FULL_TEXT
    running = [c.usage_metadata.candidates_token_count for c in chunks if c.usage_metadata]
    assert running == [5, 10, 15, 20]
    last = chunks[-1].usage_metadata
    assert last is not None
    assert (last.prompt_token_count, last.total_token_count) == (PROMPT_TOKENS, PROMPT_TOKENS + 20)
    recorded = gateway.upstream.state.requests[-1]
    assert recorded.path.endswith("/models/gemini-2.5-flash:streamGenerateContent")
    assert recorded.query_string == "alt=sse"  # the caller's key is never forwarded in the query
    [entry] = await settled(gateway, "acme", 1)
    assert (entry.input_tokens, entry.output_tokens) == (PROMPT_TOKENS, 20)


async def test_gemini_models_list_shows_only_models_the_key_may_use(gateway: Gateway) -> None:
    everything = await gateway.new_key()
    restricted = await gateway.new_key(create_account=False, models=["gemini-*"])
    async with gemini_client(gateway, everything) as client:
        all_names = [m.name async for m in await client.models.list()]
    async with gemini_client(gateway, restricted) as client:
        models = [m async for m in await client.models.list()]
    assert all_names == [f"models/{m}" for m in ALL_MODELS]
    assert [m.name for m in models] == ["models/gemini-2.5-flash"]
    assert models[0].output_token_limit == 1000


# --- A key over its limit: what each SDK raises -----------------------------------------------


def assert_rpm_headers(headers: Any) -> int:
    """retry-after-ms is the real wait (< 60 s for a 1 rpm key just used), retry-after rounds up."""
    wait_ms = int(headers["retry-after-ms"])
    assert 55_000 < wait_ms <= 60_000
    assert headers["retry-after"] == str(math.ceil(wait_ms / 1000))
    assert "x-should-retry" not in headers  # waiting cures it: the SDK may retry
    return wait_ms


async def test_openai_over_rpm_raises_rate_limit_error(gateway: Gateway) -> None:
    key = await gateway.new_key(rpm=1)
    async with openai_client(gateway, key, max_retries=0) as client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT_MESSAGES)
        with pytest.raises(openai.RateLimitError) as plain:
            await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT_MESSAGES)
        with pytest.raises(openai.RateLimitError) as streamed:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=CHAT_MESSAGES, stream=True
            )
    for err in (plain.value, streamed.value):
        assert err.status_code == 429
        assert isinstance(err.body, dict)  # the SDK unwraps {"error": {...}}
        assert err.body["type"] == "rate_limit_error"
        assert err.body["reason"] == "rpm_exceeded"
        assert err.body["rate_limit"] == {"rpm": 1, "qps": 1 / 60, "tpm": None}
        assert "1 request per minute" in err.body["message"]
        assert err.code == "429"
        assert_rpm_headers(err.response.headers)
    assert len(gateway.upstream.state.requests) == 1  # rejected requests never reach upstream


async def test_anthropic_over_rpm_raises_rate_limit_error(gateway: Gateway) -> None:
    key = await gateway.new_key(rpm=1)
    async with anthropic_client(gateway, key, max_retries=0) as client:
        await client.messages.create(
            model="claude-sonnet-4-6", messages=CLAUDE_MESSAGES, max_tokens=50
        )
        with pytest.raises(anthropic.RateLimitError) as plain:
            await client.messages.create(
                model="claude-sonnet-4-6", messages=CLAUDE_MESSAGES, max_tokens=50
            )
        with pytest.raises(anthropic.RateLimitError) as streamed:
            async with client.messages.stream(
                model="claude-sonnet-4-6", messages=CLAUDE_MESSAGES, max_tokens=50
            ) as stream:
                await stream.get_final_message()
    for err in (plain.value, streamed.value):
        assert err.status_code == 429
        assert isinstance(err.body, dict)
        assert err.body["type"] == "error"
        assert err.body["error"]["type"] == "rate_limit_error"
        assert err.body["error"]["reason"] == "rpm_exceeded"
        assert err.body["request_id"] == err.response.headers["request-id"]
        assert_rpm_headers(err.response.headers)
        assert err.response.headers["anthropic-ratelimit-requests-limit"] == "1"
        assert err.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert len(gateway.upstream.state.requests) == 1


def retry_delay_ms(details: list[dict[str, Any]]) -> int:
    [info] = [d for d in details if d["@type"] == "type.googleapis.com/google.rpc.RetryInfo"]
    delay = info["retryDelay"]
    assert delay.endswith("s")
    return round(float(delay[:-1]) * 1000)


async def test_gemini_over_rpm_raises_client_error_with_retry_info(gateway: Gateway) -> None:
    key = await gateway.new_key(rpm=1)
    async with gemini_client(gateway, key) as client:
        await client.models.generate_content(model="gemini-2.5-flash", contents=USER)
        with pytest.raises(genai_errors.ClientError) as plain:
            await client.models.generate_content(model="gemini-2.5-flash", contents=USER)
        with pytest.raises(genai_errors.ClientError) as streamed:
            stream = await client.models.generate_content_stream(
                model="gemini-2.5-flash", contents=USER
            )
            async for _ in stream:
                pass
    for err in (plain.value, streamed.value):
        assert (err.code, err.status) == (429, "RESOURCE_EXHAUSTED")
        error = err.details["error"]
        assert error["reason"] == "rpm_exceeded"
        assert "1 request per minute" in error["message"]
        assert 55_000 < retry_delay_ms(error["details"]) <= 60_000
    assert len(gateway.upstream.state.requests) == 1


async def test_gemini_retries_a_429_only_with_the_readme_retry_options(gateway: Gateway) -> None:
    """google-genai retries nothing by default; with the README's HttpRetryOptions a 429 (here
    the one request in flight the key allows, held by a slow stream) is retried and answered."""
    key = await gateway.new_key(concurrency=1)
    statuses: list[int] = []

    async def on_request_end(
        _session: aiohttp.ClientSession, _context: Any, params: aiohttp.TraceRequestEndParams
    ) -> None:
        statuses.append(params.response.status)

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    slow_stream = {"x-goog-api-key": key, "x-mock-chunk-delay-ms": "400"}  # 4 chunks: 1.2 s
    url = f"{gateway.url}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    async with (
        aiohttp.ClientSession() as raw,
        raw.post(
            url, json={"contents": [{"parts": [{"text": USER}]}]}, headers=slow_stream
        ) as held,
    ):
        assert held.status == 200
        async with aiohttp.ClientSession(trace_configs=[trace]) as session:
            options = genai_types.HttpOptions(base_url=gateway.url, aiohttp_client=session)
            client = genai.Client(api_key=key, http_options=options)
            with pytest.raises(genai_errors.ClientError) as refused:
                await client.aio.models.generate_content(model="gemini-2.5-flash", contents=USER)
            assert (refused.value.code, statuses) == (429, [429])
            retry = genai_types.HttpRetryOptions(attempts=4, initial_delay=1.0, max_delay=30.0)
            options.retry_options = retry
            client = genai.Client(api_key=key, http_options=options)
            answer = await client.aio.models.generate_content(
                model="gemini-2.5-flash", contents=USER
            )
        assert answer.text == FULL_TEXT
        assert statuses[0] == statuses[1] == 429 and statuses[-1] == 200
        assert FULL_TEXT.split()[-1] in (await held.read()).decode()


# --- The SDKs' own retries obey retry-after-ms ------------------------------------------------

# A tpm bucket of 6000 refills 0.1 token per ms. A first request whose real usage is nearly the
# whole bucket (a 23000-char prompt = 5750 input tokens, + 20 output) drains it; once settled,
# the bucket holds TPM - used. A second, small request that reserves RETRY_MAX_TOKENS more
# than that must wait about (estimate - level) / 0.1 ms: the gateway's retry-after-ms.
TPM = 6000
BIG_PROMPT = "x" * 23_000
RETRY_MAX_TOKENS = 300


@dataclass
class RetryCase:
    log: AttemptLog
    t0: float  # just before the draining request was sent
    used: int  # tokens the draining request really used (what settlement leaves charged)


def expected_wait_ms(gw: Gateway, case: RetryCase, max_tokens: int) -> int:
    """The longest wait the retried request can need: its estimate minus the settled level."""
    body = gw.upstream.state.requests[-1].body  # the bytes every attempt carried
    estimate = math.ceil(len(body) / 4) + max_tokens
    return math.ceil((estimate - (TPM - case.used)) * 60_000 / TPM)


def assert_retry_obeyed(gw: Gateway, case: RetryCase, max_tokens: int) -> None:
    first, retry = case.log.attempts
    assert (first.status, retry.status) == (429, 200)
    assert (first.retry_count, retry.retry_count) == ("0", "1")
    assert first.error is not None
    reason = first.error.get("reason") or first.error["error"]["reason"]
    assert reason == "tpm_exceeded"
    wait_ms = int(first.headers["retry-after-ms"])
    assert first.headers["retry-after"] == str(math.ceil(wait_ms / 1000))
    # The hint is the bucket's real refill time, not a fixed window: at most the deficit left
    # once the first request settled, less whatever refilled between then and the 429.
    longest = expected_wait_ms(gw, case, max_tokens)
    elapsed_ms = (first.received - case.t0) * 1000
    assert longest - elapsed_ms - 5 <= wait_ms <= longest
    assert wait_ms >= 300  # the timing check below is meaningful
    # The SDK slept what the gateway said (not its own backoff), then the retry passed.
    gap_ms = (retry.sent - first.received) * 1000
    assert wait_ms - 5 <= gap_ms < wait_ms + 400


@pytest.mark.slow  # ~2 s over its 2 cases: the SDK sleeps Retry-After
async def test_openai_sdk_retry_waits_retry_after_ms_then_succeeds(gateway: Gateway) -> None:
    key = await gateway.new_key(tpm=TPM)
    log = AttemptLog()
    async with openai_client(gateway, key, max_retries=2, log=log) as client:
        t0 = time.monotonic()
        drain = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": BIG_PROMPT}], max_tokens=20
        )
        assert drain.usage is not None and drain.usage.total_tokens == 5750 + 20
        await settled(gateway, "acme", 1)
        log.attempts.clear()
        case = RetryCase(log, t0, drain.usage.total_tokens)
        resp = await client.chat.completions.create(
            model="gpt-4o-mini", messages=CHAT_MESSAGES, max_tokens=RETRY_MAX_TOKENS
        )
    assert resp.choices[0].message.content == FULL_TEXT
    assert_retry_obeyed(gateway, case, RETRY_MAX_TOKENS)


@pytest.mark.slow  # ~2 s over its 2 cases: the SDK sleeps Retry-After
async def test_anthropic_sdk_retry_waits_retry_after_ms_then_succeeds(gateway: Gateway) -> None:
    key = await gateway.new_key(tpm=TPM)
    log = AttemptLog()
    async with anthropic_client(gateway, key, max_retries=2, log=log) as client:
        t0 = time.monotonic()
        drain = await client.messages.create(
            model="claude-sonnet-4-6",
            messages=[{"role": "user", "content": BIG_PROMPT}],
            max_tokens=20,
        )
        assert (drain.usage.input_tokens, drain.usage.output_tokens) == (5750, 20)
        await settled(gateway, "acme", 1)
        log.attempts.clear()
        case = RetryCase(log, t0, 5750 + 20)
        # Streaming this time: the SDK retries a stream that was refused before it began.
        async with client.messages.stream(
            model="claude-sonnet-4-6", messages=CLAUDE_MESSAGES, max_tokens=RETRY_MAX_TOKENS
        ) as stream:
            msg = await stream.get_final_message()
    assert msg.content[0].type == "text" and msg.content[0].text == FULL_TEXT
    assert gateway.upstream.state.requests[-1].json()["stream"] is True
    assert_retry_obeyed(gateway, case, RETRY_MAX_TOKENS)


async def test_openai_sdk_does_not_retry_a_request_over_the_tpm_capacity(
    gateway: Gateway,
) -> None:
    key = await gateway.new_key(tpm=1000)
    log = AttemptLog()
    async with openai_client(gateway, key, max_retries=2, log=log) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=CHAT_MESSAGES, max_tokens=5000
            )
    [attempt] = log.attempts  # x-should-retry: false beats the SDK's retry-on-429
    assert attempt.headers["x-should-retry"] == "false"
    assert "retry-after-ms" not in attempt.headers and "retry-after" not in attempt.headers
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["reason"] == "request_exceeds_limit"
    assert "1000 tokens per minute" in caught.value.body["message"]
    assert gateway.upstream.state.requests == []


async def test_anthropic_sdk_does_not_retry_a_request_over_the_tpm_capacity(
    gateway: Gateway,
) -> None:
    key = await gateway.new_key(tpm=1000)
    log = AttemptLog()
    async with anthropic_client(gateway, key, max_retries=2, log=log) as client:
        with pytest.raises(anthropic.RateLimitError) as caught:
            await client.messages.create(
                model="claude-sonnet-4-6", messages=CLAUDE_MESSAGES, max_tokens=5000
            )
    [attempt] = log.attempts
    assert attempt.headers["x-should-retry"] == "false"
    assert "retry-after-ms" not in attempt.headers and "retry-after" not in attempt.headers
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["reason"] == "request_exceeds_limit"
    assert gateway.upstream.state.requests == []


# --- Revoked keys -----------------------------------------------------------------------------


async def revoke(gw: Gateway, secret: str) -> None:
    record = await gw.accounts.find_key(secret)
    assert record is not None
    await gw.accounts.revoke_key(record.id)


async def test_revoked_key_is_an_authentication_error_in_every_sdk(gateway: Gateway) -> None:
    key = await gateway.new_key()
    oai_log, claude_log = AttemptLog(), AttemptLog()
    async with (
        openai_client(gateway, key, max_retries=2, log=oai_log) as oai,
        anthropic_client(gateway, key, max_retries=2, log=claude_log) as claude,
        gemini_client(gateway, key) as gemini,
    ):
        # The key works (and is now in the gateway's key cache) ...
        await oai.chat.completions.create(model="gpt-4o-mini", messages=CHAT_MESSAGES)
        await revoke(gateway, key)
        # ... and stops working on the very next request, in every protocol.
        with pytest.raises(openai.AuthenticationError) as oai_err:
            await oai.chat.completions.create(model="gpt-4o-mini", messages=CHAT_MESSAGES)
        with pytest.raises(openai.AuthenticationError):
            await oai.models.list()
        with pytest.raises(anthropic.AuthenticationError) as claude_err:
            await claude.messages.create(
                model="claude-sonnet-4-6", messages=CLAUDE_MESSAGES, max_tokens=50
            )
        with pytest.raises(genai_errors.ClientError) as gemini_err:
            await gemini.models.generate_content(model="gemini-2.5-flash", contents=USER)
    assert oai_err.value.status_code == 401
    assert isinstance(oai_err.value.body, dict)
    assert oai_err.value.body["type"] == "authentication_error"
    assert oai_err.value.body["reason"] == "key_revoked"
    assert isinstance(claude_err.value.body, dict)
    assert claude_err.value.body["error"]["type"] == "authentication_error"
    assert claude_err.value.body["error"]["reason"] == "key_revoked"
    assert (gemini_err.value.code, gemini_err.value.status) == (401, "UNAUTHENTICATED")
    assert gemini_err.value.details["error"]["reason"] == "key_revoked"
    # 401 is final for the SDKs: one attempt per call, no retries.
    assert [a.status for a in oai_log.attempts] == [200, 401, 401]
    assert [a.status for a in claude_log.attempts] == [401]
    assert len(gateway.upstream.state.requests) == 1
