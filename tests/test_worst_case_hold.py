"""The balance hold is a true worst case (§4, §5; issue 17).

Whatever a prepaid request is held for is what the upstream is allowed: an uncapped body is
sent with the cap it was held for, answers are counted per choice, the input estimate bounds
text in any script, input the bytes cannot bound is refused (or held at a configured
allowance), cached input is priced as such, and a complete answer without usage is charged
the held worst case.

"An upstream that bills every token it was allowed" is the mock with ``x-mock-chunks``
raised: uncapped it answers 100,000 tokens, capped exactly the cap.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.util
import json
import random
import struct
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from ratelimit_gw.metering import billable_usage
from ratelimit_gw.money import cost_nano, format_usd, parse_usd
from ratelimit_gw.protocols import (
    ADAPTERS,
    Route,
    Usage,
    estimate_input_tokens,
    input_token_bound,
)
from ratelimit_gw.relay import RelayResult
from ratelimit_gw.services import SERVICES
from ratelimit_gw.settings import ConfigError, build_settings
from ratelimit_gw.storage import Storage
from ratelimit_gw.worst_case import Hold

from .conftest import Gateway, Upstream, gateway_config, start_gateway
from .http_helpers import auth

FLOOD = {"x-mock-chunks": "20000"}  # 20,000 chunks x 5 tokens: 100,000 tokens if uncapped
MODEL_CAP = 1000  # every test model's default_max_output (conftest)
PROMPT = "Write as much as you are allowed to."
PROMPT_TOKENS = -(-len(PROMPT) // 4)  # the mock's count: a token per 4 prompt characters
USER = [{"role": "user", "content": PROMPT}]
CONTENTS = [{"role": "user", "parts": [{"text": PROMPT}]}]
GEMINI_PATH = "/v1beta/models/gemini-2.5-flash:generateContent"
PROXY_PATH = "/proxy-api/acme-ai/llm/v1/chat/completions"
# route -> (protocol, path, an uncapped body, its cap field as the upstream got it)
UNCAPPED: dict[str, tuple[str, str, dict[str, Any], tuple[str, ...]]] = {
    "chat": (
        "openai",
        "/v1/chat/completions",
        {"model": "gpt-4o", "messages": USER},
        ("max_completion_tokens",),
    ),
    "responses": (
        "openai",
        "/v1/responses",
        {"model": "gpt-4o", "input": PROMPT},
        ("max_output_tokens",),
    ),
    "messages": (
        "anthropic",
        "/v1/messages",
        {"model": "claude-sonnet-4-6", "messages": USER},
        ("max_tokens",),
    ),
    "generate": (
        "gemini",
        GEMINI_PATH,
        {"contents": CONTENTS},
        ("generationConfig", "maxOutputTokens"),
    ),
    "proxy-api": (
        "openai",
        PROXY_PATH,
        {"model": "gpt-4o", "messages": USER},
        ("max_completion_tokens",),
    ),
}
CAPPED = {
    "chat": {"max_tokens": 7},
    "responses": {"max_output_tokens": 7},
    "messages": {"max_tokens": 7},
    "generate": {"generationConfig": {"maxOutputTokens": 7}},
    "proxy-api": {"max_completion_tokens": 7},
}


@pytest.fixture
async def gw(upstream: Upstream, storage: Storage) -> AsyncIterator[Gateway]:
    """The test gateway plus a custom endpoint on the mock, for /proxy-api's priced path."""
    endpoints = [{"provider_account": "acme-ai", "name": "llm", "base_url": upstream.url}]
    runner, gateway = await start_gateway(upstream, storage, custom_endpoints=endpoints)
    try:
        yield gateway
    finally:
        await runner.cleanup()


async def post(
    http: aiohttp.ClientSession,
    gateway: Gateway,
    path: str,
    body: bytes,
    headers: dict[str, str],
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    async with http.post(
        gateway.url + path, data=body, headers={"Content-Type": "application/json", **headers}
    ) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


async def all_settled(gateway: Gateway, account: str = "acme") -> None:
    """Wait (bounded) until the account holds nothing: every request settled."""
    settler = gateway.app[SERVICES].settler
    deadline = time.monotonic() + 10
    while True:
        await settler.drain()
        state = await gateway.accounts.get_account(account)
        if state.holds_live == 0 and settler.pending == 0:
            return
        assert time.monotonic() < deadline, f"holds never settled: {state}"
        await asyncio.sleep(0.01)


def sent_bodies(gateway: Gateway) -> list[bytes]:
    return [r.body for r in gateway.upstream.state.requests]


def dig(document: dict[str, Any], path: tuple[str, ...]) -> Any:
    for name in path:
        document = document[name]
    return document


# --- the attack ---------------------------------------------------------------------------


@pytest.mark.parametrize("route", list(UNCAPPED))
async def test_concurrent_uncapped_calls_never_take_a_prepaid_balance_below_zero(
    gw: Gateway, http: aiohttp.ClientSession, route: str
) -> None:
    protocol, path, body, cap_path = UNCAPPED[route]
    key = await gw.new_key(balance_usd="0.35")
    raw = json.dumps(body).encode()
    replies = await asyncio.gather(
        *(post(http, gw, path, raw, {**auth(protocol, key), **FLOOD}) for _ in range(5))
    )
    assert sorted({status for status, _, _ in replies}) in ([200], [200, 402]), replies
    await all_settled(gw)
    state = await gw.accounts.get_account("acme")
    assert not state.balance_usd.startswith("-"), state
    assert state.overruns == 0
    # Each answer stopped at the cap it was held for, which the upstream was sent.
    for sent in sent_bodies(gw):
        assert dig(json.loads(sent), cap_path) == MODEL_CAP


# --- the body sent upstream ---------------------------------------------------------------


@pytest.mark.parametrize("route", list(UNCAPPED))
async def test_uncapped_prepaid_request_is_sent_the_cap_it_was_held_for(
    gw: Gateway, http: aiohttp.ClientSession, route: str
) -> None:
    protocol, path, body, cap_path = UNCAPPED[route]
    key = await gw.new_key(balance_usd="1.00")
    status, _, _ = await post(http, gw, path, json.dumps(body).encode(), auth(protocol, key))
    assert status == 200
    [sent] = sent_bodies(gw)
    assert dig(json.loads(sent), cap_path) == MODEL_CAP


@pytest.mark.parametrize("route", list(UNCAPPED))
async def test_metered_or_capped_request_reaches_the_upstream_byte_identical(
    gw: Gateway, http: aiohttp.ClientSession, route: str
) -> None:
    protocol, path, body, _ = UNCAPPED[route]
    metered = await gw.new_key("metered")
    prepaid = await gw.new_key("prepaid", balance_usd="1.00")
    uncapped = json.dumps(body).encode()
    capped = json.dumps({**body, **CAPPED[route]}).encode()
    for key, raw in ((metered, uncapped), (metered, capped), (prepaid, capped)):
        status, _, _ = await post(http, gw, path, raw, auth(protocol, key))
        assert status == 200
    assert sent_bodies(gw) == [uncapped, capped, capped]


async def test_gemini_zero_output_cap_means_unset_and_is_replaced(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gw.new_key(balance_usd="1.00")
    body = {"contents": CONTENTS, "generationConfig": {"maxOutputTokens": 0, "temperature": 1}}
    status, answer, _ = await post(
        http, gw, GEMINI_PATH, json.dumps(body).encode(), {**auth("gemini", key), **FLOOD}
    )
    assert status == 200
    [sent] = sent_bodies(gw)
    assert json.loads(sent)["generationConfig"] == {"maxOutputTokens": MODEL_CAP, "temperature": 1}
    assert answer["usageMetadata"]["candidatesTokenCount"] == MODEL_CAP


# --- answers per request ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "path", "body"),
    [
        ("openai", "/v1/chat/completions", {"model": "gpt-4o", "messages": USER, "n": 3}),
        (
            "gemini",
            GEMINI_PATH,
            {"contents": CONTENTS, "generationConfig": {"candidateCount": 3}},
        ),
    ],
)
async def test_hold_and_token_estimate_count_every_answer_asked_for(
    gw: Gateway, http: aiohttp.ClientSession, protocol: str, path: str, body: dict[str, Any]
) -> None:
    raw = json.dumps(body).encode()
    estimate = estimate_input_tokens(len(raw)) + 3 * MODEL_CAP
    key = await gw.new_key("metered", tpm=100_000)
    status, _, headers = await post(http, gw, path, raw, auth(protocol, key))
    assert status == 200
    assert headers["x-ratelimit-remaining-tokens"] == str(100_000 - estimate)

    poor = await gw.new_key("poor", balance_usd="0.000001")
    status, error, _ = await post(http, gw, path, raw, auth(protocol, poor))
    assert status == 402
    assert (
        f"at most {input_token_bound(len(raw))} input tokens + 3 × {MODEL_CAP} output"
        in (error["error"]["message"])
    )


async def test_absurd_number_of_answers_is_refused_naming_the_field(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gw.new_key()
    raw = json.dumps({"model": "gpt-4o", "messages": USER, "n": 10_000}).encode()
    status, error, _ = await post(http, gw, "/v1/chat/completions", raw, auth("openai", key))
    assert (status, error["error"]["param"]) == (400, "n")
    assert sent_bodies(gw) == []


# --- the input estimate -------------------------------------------------------------------

_RNG = random.Random(17)
TEXT_SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog, and then it sleeps. " * 40,
    "minified-js": (
        '!function(e,t){"object"==typeof exports&&"undefined"!=typeof module?module.exports='
        't():"function"==typeof define&&define.amd?define(t):(e=e||self).V=t()}(this,function()'
        '{"use strict";var e=Object.freeze({});function t(e){return null==e}' * 12
    ),
    "dense-json": json.dumps(
        [{"id": i, "v": [i * 1.5, None, True], "k": f"a{i}"} for i in range(150)],
        separators=(",", ":"),
    ),
    "cjk-common": "我们的生活中充满了各种各样的挑战和机遇，每个人都应该努力学习。" * 20,
    "cjk-rare": "龘靐齉齾爩鱻麤龗灪籱䨻䯂䴍䲜𪚥𠔻𡿨𠀀𪛖" * 20,
    "japanese": "日本語のテキストはひらがなとカタカナと漢字を混ぜて書きます。" * 20,
    "emoji": "😀😃😄😁😆😅🤣😂🙂🙃👍🏽👋🏿" * 20,
    "emoji-zwj-and-flags": "👨‍👩‍👧‍👦👩‍❤️‍💋‍👨🏳️‍🌈🧑🏽‍🚀🇺🇸🇯🇵🇩🇪🇫🇷🇧🇷🇮🇳" * 15,
    # The worst ASCII there is: pairs no merge joins, one token per byte.
    "ascii-no-merges": "a`~^" * 300,
    "random-printable": "".join(_RNG.choice([chr(c) for c in range(33, 127)]) for _ in range(2000)),
}
# Where each protocol's request holds its text.
WRAPPERS = {
    "chat": lambda text: {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]},
    "messages": lambda text: {
        "model": "claude-sonnet-4-6",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
    },
    "generate": lambda text: {"contents": [{"role": "user", "parts": [{"text": text}]}]},
}
# The official rank files and their SHA-256, as tiktoken_ext.openai_public names them.
ENCODINGS = {
    "o200k_base": (
        "o200k.vocab",
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "cl100k.vocab",
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}


def _tiktoken_file(vocab: bytes) -> bytes:
    """quicktok's packed ranks (u32 count, then u16 length, bytes, u32 rank each) → the
    .tiktoken text tiktoken reads: one "base64(token) rank" line per token."""
    (count,) = struct.unpack_from("<I", vocab, 0)
    offset, lines = 4, []
    for _ in range(count):
        (length,) = struct.unpack_from("<H", vocab, offset)
        token = vocab[offset + 2 : offset + 2 + length]
        (rank,) = struct.unpack_from("<I", vocab, offset + 2 + length)
        offset += 6 + length
        lines.append(base64.b64encode(token) + b" " + str(rank).encode())
    return b"\n".join(lines) + b"\n"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """OpenAI's real tokenizers, offline: tiktoken reads the official rank files from its
    cache, which is filled from the copies quicktok-v1 ships, checked against their hashes."""
    spec = importlib.util.find_spec("quicktok")
    assert spec is not None and spec.submodule_search_locations
    data = Path(spec.submodule_search_locations[0]) / "data"
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for vocab, url, sha256 in ENCODINGS.values():
        ranks = _tiktoken_file((data / vocab).read_bytes())
        assert hashlib.sha256(ranks).hexdigest() == sha256  # exactly OpenAI's file
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(ranks)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        import tiktoken

        yield {name: tiktoken.get_encoding(name) for name in ENCODINGS}


@pytest.mark.parametrize("sample", list(TEXT_SAMPLES))
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_input_bound_holds_for_real_token_counts_in_any_script(
    tokenizers: dict[str, Any], sample: str, wrapper: str
) -> None:
    text = TEXT_SAMPLES[sample]
    for ascii_only in (True, False):  # \uXXXX escapes, as Python's json.dumps sends, or UTF-8
        body = json.dumps(WRAPPERS[wrapper](text), ensure_ascii=ascii_only).encode()
        # Byte-level BPE (and SentencePiece's byte fallback) never emit more tokens than the
        # text's UTF-8 bytes, and JSON holds each character in at least that many bytes.
        assert len(body) >= len(text.encode())
        for name, encoding in tokenizers.items():
            # + OpenAI's per-message framing (3) and reply priming (3).
            real = len(encoding.encode_ordinary(text)) + 6
            assert input_token_bound(len(body)) >= real, (name, len(body), real)


# --- input the bytes do not bound ---------------------------------------------------------

PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
# route -> (body, field paths the adapter names)
UNBOUNDED: dict[str, tuple[Route, dict[str, Any], list[str]]] = {
    "chat-image-url": (
        Route.CHAT,
        {
            "model": "gpt-4o",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "https://example.test/a.png"}},
                        {"type": "image_url", "image_url": {"url": PNG}},
                    ],
                }
            ],
        },
        ["messages[0].content[1]", "messages[0].content[2]"],
    ),
    "chat-file-and-audio": (
        Route.CHAT,
        {
            "model": "gpt-4o",
            "messages": [
                {"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]},
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
            ],
        },
        ["messages[0].content[0]", "messages[1].content[0]"],
    ),
    "chat-web-search": (
        Route.CHAT,
        {"model": "gpt-4o", "messages": USER, "web_search_options": {}},
        ["web_search_options"],
    ),
    "chat-escaped-key": (  # a marker spelled with \u escapes is still found
        Route.CHAT,
        {"model": "gpt-4o", "messages": USER, "web_search_options": {}},
        ["web_search_options"],
    ),
    "responses-state": (
        Route.RESPONSES,
        {
            "model": "gpt-4o",
            "input": "go on",
            "previous_response_id": "resp_1",
            "conversation": "conv_1",
            "prompt": {"id": "pmpt_1"},
        },
        ["previous_response_id", "conversation", "prompt"],
    ),
    "responses-media-and-tools": (
        Route.RESPONSES,
        {
            "model": "gpt-4o",
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "hi"},
                        {"type": "input_image", "image_url": PNG},
                        {"type": "input_file", "file_id": "file-1"},
                    ],
                },
                {"type": "item_reference", "id": "msg_1"},
                {"type": "function_call_output", "call_id": "c", "output": "plain text"},
            ],
            "tools": [
                {"type": "function", "name": "f", "parameters": {}},
                {"type": "web_search"},
                {"type": "file_search", "vector_store_ids": ["vs_1"]},
            ],
        },
        [
            "tools[1]",
            "tools[2]",
            "input[0].content[1]",
            "input[0].content[2]",
            "input[1]",
        ],
    ),
    "messages-media-and-tools": (
        Route.MESSAGES,
        {
            "model": "claude-sonnet-4-6",
            "max_tokens": 10,
            "system": [{"type": "text", "text": "be brief"}],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "url", "url": "https://x.test/a"}},
                        {"type": "document", "source": {"type": "file", "file_id": "f"}},
                        {"type": "document", "source": {"type": "text", "data": "plain"}},
                        {
                            "type": "tool_result",
                            "tool_use_id": "t",
                            "content": [{"type": "image", "source": {"type": "base64"}}],
                        },
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "t", "name": "f", "input": {"type": "image"}}
                    ],
                },
            ],
            "tools": [
                {"name": "f", "input_schema": {"type": "object"}},
                {"type": "web_search_20250305", "name": "web_search"},
            ],
            "mcp_servers": [{"type": "url", "url": "https://mcp.test", "name": "m"}],
            "container": "container_1",
        },
        [
            "mcp_servers",
            "container",
            "tools[1]",
            "messages[0].content[0]",
            "messages[0].content[1]",
            "messages[0].content[3].content[0]",
        ],
    ),
    "gemini-media-cache-and-tools": (
        Route.GENERATE,
        {
            "cachedContent": "cachedContents/abc",
            "contents": [
                {
                    "role": "user",
                    "parts": [
                        {"text": "hi"},
                        {"inlineData": {"mimeType": "image/png", "data": "iVBOR"}},
                        {"file_data": {"file_uri": "gs://b/f.pdf"}},
                    ],
                },
                {
                    "role": "user",
                    "parts": [
                        {
                            "functionResponse": {
                                "name": "f",
                                "response": {},
                                "parts": [{"inlineData": {"mimeType": "image/png"}}],
                            }
                        }
                    ],
                },
            ],
            "tools": [{"functionDeclarations": []}, {"googleSearch": {}, "codeExecution": {}}],
        },
        [
            "cachedContent",
            "tools[1].googleSearch",
            "tools[1].codeExecution",
            "contents[0].parts[1].inlineData",
            "contents[0].parts[2].file_data",
            "contents[1].parts[0].functionResponse.parts[0].inlineData",
        ],
    ),
}
_ADAPTER_OF = {
    Route.CHAT: "openai",
    Route.RESPONSES: "openai",
    Route.MESSAGES: "anthropic",
    Route.GENERATE: "gemini",
}


def _raw(case: str) -> bytes:
    raw = json.dumps(UNBOUNDED[case][1]).encode()
    if case == "chat-escaped-key":
        raw = raw.replace(b'"web_search_options"', b'"web\\u005fsearch\\u005Foptions"')
    return raw


@pytest.mark.parametrize("case", list(UNBOUNDED))
def test_adapters_name_every_part_whose_cost_the_bytes_do_not_bound(case: str) -> None:
    route, _, paths = UNBOUNDED[case]
    found = ADAPTERS[_ADAPTER_OF[route]].unbounded_inputs(route, _raw(case))
    assert [part.path for part in found] == paths


@pytest.mark.parametrize(
    ("name", "route", "body"),
    [
        ("openai", Route.CHAT, WRAPPERS["chat"]("look at the image_url field")),
        (
            "openai",
            Route.RESPONSES,
            {"model": "m", "input": "hi", "tools": [{"type": "function", "name": "f"}]},
        ),
        ("anthropic", Route.MESSAGES, WRAPPERS["messages"]('"image" and "document"')),
        ("gemini", Route.GENERATE, {"contents": [], "tools": [{"function_declarations": []}]}),
    ],
)
def test_text_tool_definitions_and_inline_text_are_bounded(
    name: str, route: Route, body: dict[str, Any]
) -> None:
    assert ADAPTERS[name].unbounded_inputs(route, json.dumps(body).encode()) == []


ROUTE_PATH = {
    Route.CHAT: "/v1/chat/completions",
    Route.RESPONSES: "/v1/responses",
    Route.MESSAGES: "/v1/messages",
    Route.GENERATE: GEMINI_PATH,
}
ALLOWANCE = 2000


@pytest.fixture
async def allowance_gw(upstream: Upstream, storage: Storage) -> AsyncIterator[Gateway]:
    """Every test model with a per-reference allowance."""
    models = gateway_config(upstream.url, storage.url)["models"]
    for model in models:
        model["reference_allowance_tokens"] = ALLOWANCE
    runner, gateway = await start_gateway(upstream, storage, models=models)
    try:
        yield gateway
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("case", list(UNBOUNDED))
async def test_prepaid_request_with_unbounded_input_is_refused_naming_the_field(
    gw: Gateway, http: aiohttp.ClientSession, case: str
) -> None:
    route, _, paths = UNBOUNDED[case]
    protocol = _ADAPTER_OF[route]
    key = await gw.new_key(balance_usd="1.00")
    status, error, _ = await post(http, gw, ROUTE_PATH[route], _raw(case), auth(protocol, key))
    assert status == 400, error
    envelope = error["error"]
    assert envelope["reason"] == "unbounded_input"
    assert f"`{paths[0]}`" in envelope["message"]
    assert "reference_allowance_tokens" in envelope["message"]
    # Refused before admission: nothing sent, held or charged.
    assert sent_bodies(gw) == []
    state = await gw.accounts.get_account("acme")
    assert (state.balance_usd, state.held_usd, state.holds_live) == ("1.00", "0.00", 0)


@pytest.mark.parametrize("case", ["chat-image-url", "responses-state", "messages-media-and-tools"])
async def test_metered_request_with_unbounded_input_passes(
    gw: Gateway, http: aiohttp.ClientSession, case: str
) -> None:
    route, _, _ = UNBOUNDED[case]
    key = await gw.new_key()
    status, _, _ = await post(
        http, gw, ROUTE_PATH[route], _raw(case), auth(_ADAPTER_OF[route], key)
    )
    assert status == 200
    assert sent_bodies(gw) == [_raw(case)]


@pytest.mark.parametrize(
    "case", ["chat-image-url", "responses-state", "gemini-media-cache-and-tools"]
)
async def test_allowance_lets_prepaid_requests_through_and_holds_it_per_part(
    allowance_gw: Gateway, http: aiohttp.ClientSession, case: str
) -> None:
    route, body, paths = UNBOUNDED[case]
    raw = _raw(case)
    key = await allowance_gw.new_key(balance_usd="1.00", tpm=1_000_000)
    status, _, headers = await post(
        http, allowance_gw, ROUTE_PATH[route], raw, auth(_ADAPTER_OF[route], key)
    )
    assert status == 200
    cap = body.get("max_tokens", MODEL_CAP)
    estimate = estimate_input_tokens(len(raw)) + len(paths) * ALLOWANCE + cap
    assert headers["x-ratelimit-remaining-tokens"] == str(1_000_000 - estimate)


# --- cached input -------------------------------------------------------------------------


@pytest.fixture
async def cache_gw(upstream: Upstream, storage: Storage) -> AsyncIterator[Gateway]:
    """gpt-4o, claude and gemini with prices for cache reads and writes; gpt-4o-mini without."""
    models = gateway_config(upstream.url, storage.url)["models"]
    for model in models:
        if model["id"] != "gpt-4o-mini":
            model.update(cache_read_per_mtok="0.25", cache_write_per_mtok="3.75")
    runner, gateway = await start_gateway(upstream, storage, models=models)
    try:
        yield gateway
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("protocol", "path", "body", "reads", "writes"),
    [
        ("openai", "/v1/chat/completions", {"model": "gpt-4o", "messages": USER}, 5, 0),
        ("openai", "/v1/responses", {"model": "gpt-4o", "input": PROMPT}, 5, 0),
        ("openai", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": USER}, 5, 0),
        (
            "anthropic",
            "/v1/messages",
            {"model": "claude-sonnet-4-6", "max_tokens": 50, "messages": USER},
            4,
            3,
        ),
        ("gemini", GEMINI_PATH, {"contents": CONTENTS}, 6, 0),
    ],
)
async def test_cached_input_is_charged_at_its_own_price_defaulting_to_the_input_price(
    cache_gw: Gateway,
    http: aiohttp.ClientSession,
    protocol: str,
    path: str,
    body: dict[str, Any],
    reads: int,
    writes: int,
) -> None:
    key = await cache_gw.new_key(balance_usd="1.00")
    cache = {"x-mock-cache-read-tokens": str(reads), "x-mock-cache-write-tokens": str(writes)}
    status, _, _ = await post(
        http, cache_gw, path, json.dumps(body).encode(), {**auth(protocol, key), **cache}
    )
    assert status == 200
    await all_settled(cache_gw)
    [charge] = [e for e in await cache_gw.accounts.ledger("acme") if e.type == "charge"]
    assert (charge.input_tokens, charge.output_tokens) == (PROMPT_TOKENS, 20)
    model = cache_gw.settings.models[body.get("model", "gemini-2.5-flash")]
    priced = model.id != "gpt-4o-mini"
    read_price = parse_usd("0.25") if priced else model.input_nano_usd_per_mtok
    write_price = parse_usd("3.75") if priced else model.input_nano_usd_per_mtok
    exact = (
        (PROMPT_TOKENS - reads - writes) * model.input_nano_usd_per_mtok
        + reads * read_price
        + writes * write_price
        + 20 * model.output_nano_usd_per_mtok
    )
    assert charge.cost_usd == format_usd(-(-exact // 1_000_000))
    assert (charge.cache_read_tokens or 0, charge.cache_write_tokens or 0) == (reads, writes)


def test_cost_prices_cache_reads_and_writes_inside_the_input_count() -> None:
    # 1,000 input of which 600 read and 100 written; $1 input, $0.10 read, $1.25 write,
    # $4 output per Mtok; 50 output.
    nano = cost_nano(
        1000,
        50,
        1_000_000_000,
        4_000_000_000,
        cache_read_tokens=600,
        cache_read_per_mtok_nano=100_000_000,
        cache_write_tokens=100,
        cache_write_per_mtok_nano=1_250_000_000,
    )
    assert nano == 300 * 1000 + 600 * 100 + 100 * 1250 + 50 * 4000
    # A report of more cached than input tokens is capped at the input.
    assert cost_nano(10, 0, 1000, 0, cache_read_tokens=50, cache_read_per_mtok_nano=0) == 0


# --- an answer without usage --------------------------------------------------------------


def test_complete_answer_without_usage_is_charged_the_held_worst_case() -> None:
    result = RelayResult()
    result.outcome, result.output_chars = "ok", 11
    hold = Hold(input_tokens=160, estimated_input_tokens=40, output_cap=1000, choices=3, nano=123)
    assert billable_usage(result, hold) == Usage(160, 3000)
    # Cut short, it keeps today's rule: the usual input and a token per 4 relayed characters.
    result.outcome = "client_disconnect"
    assert billable_usage(result, hold) == Usage(40, 3)


@pytest.fixture
async def silent_upstream() -> AsyncIterator[str]:
    """An OpenAI-compatible upstream that streams a whole answer and never reports usage,
    though the gateway asks for it."""

    async def completion(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for text in ("Hel", "lo!"):
            chunk = {"choices": [{"index": 0, "delta": {"content": text}}]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completion)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_complete_answer_without_usage_settles_at_the_hold(
    upstream: Upstream, storage: Storage, silent_upstream: str, http: aiohttp.ClientSession
) -> None:
    config = gateway_config(silent_upstream, storage.url)
    runner, gateway = await start_gateway(upstream, storage, providers=config["providers"])
    try:
        key = await gateway.new_key(balance_usd="1.00")
        raw = json.dumps({"model": "gpt-4o", "messages": USER, "stream": True}).encode()
        async with http.post(
            gateway.url + "/v1/chat/completions", data=raw, headers=auth("openai", key)
        ) as resp:
            assert resp.status == 200
            assert b"lo!" in await resp.read()
        await all_settled(gateway)
        [charge] = [e for e in await gateway.accounts.ledger("acme") if e.type == "charge"]
        input_tokens = input_token_bound(len(raw))
        assert (charge.input_tokens, charge.output_tokens) == (input_tokens, MODEL_CAP)
        hold = cost_nano(input_tokens, MODEL_CAP, parse_usd("2.50"), parse_usd("10.00"))
        assert charge.cost_usd == format_usd(hold)
    finally:
        await runner.cleanup()


# --- configuration ------------------------------------------------------------------------


def _settings(model: dict[str, Any] | None = None, provider: dict[str, Any] | None = None) -> Any:
    config = gateway_config("http://127.0.0.1:9", "memory://")
    config["providers"][0].update(provider or {})
    config["models"][0].update(model or {})
    return build_settings(config, {"RLGW_TEST_UPSTREAM_KEY": "k"})


def _config_error(**fields: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        _settings(**fields)
    return str(caught.value)


def test_model_output_limit_has_a_new_name_and_keeps_the_old_one() -> None:
    assert (
        _settings({"default_max_output": None, "max_output_tokens": 32_768})
        .models["gpt-4o-mini"]
        .max_output_tokens
        == 32_768
    )
    assert _settings().models["gpt-4o-mini"].max_output_tokens == MODEL_CAP
    assert _settings({"max_output_tokens": MODEL_CAP}).models["gpt-4o-mini"].max_output_tokens == (
        MODEL_CAP
    )
    assert _config_error(model={"max_output_tokens": 2048}) == (
        "models[0].default_max_output: is the older name of max_output_tokens, and the two "
        "differ (1000 vs 2048); keep one"
    )


def test_chat_cap_field_is_checked_with_its_path() -> None:
    provider = _settings(provider={"chat_cap_field": "max_tokens"}).providers["mock-openai"]
    assert provider.chat_cap_field == "max_tokens"
    assert _settings().providers["mock-openai"].chat_cap_field == "max_completion_tokens"
    assert _config_error(provider={"chat_cap_field": "max_output"}) == (
        "providers[0].chat_cap_field: 'max_output' is not one of max_completion_tokens, max_tokens"
    )
    config = gateway_config("http://127.0.0.1:9", "memory://")
    config["providers"][1]["chat_cap_field"] = "max_tokens"
    with pytest.raises(ConfigError) as caught:
        build_settings(config, {"RLGW_TEST_UPSTREAM_KEY": "k"})
    assert str(caught.value).startswith(
        'providers[1].chat_cap_field: applies only to protocol "openai"'
    )


def test_cache_prices_default_to_the_input_price() -> None:
    model = _settings({"cache_read_per_mtok": "0.015"}).models["gpt-4o-mini"]
    assert (model.cache_read_nano_usd_per_mtok, model.cache_write_nano_usd_per_mtok) == (
        15_000_000,
        model.input_nano_usd_per_mtok,
    )


async def test_compatible_upstream_reading_max_tokens_is_sent_that_field(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession
) -> None:
    config = gateway_config(upstream.url, storage.url)
    config["providers"][0]["chat_cap_field"] = "max_tokens"
    runner, gateway = await start_gateway(upstream, storage, providers=config["providers"])
    try:
        key = await gateway.new_key(balance_usd="1.00")
        for body in (
            {"model": "gpt-4o", "messages": USER},
            # A cap only in the newer field is no cap to this upstream: it gets max_tokens too.
            {"model": "gpt-4o", "messages": USER, "max_completion_tokens": 5},
        ):
            raw = json.dumps(body).encode()
            status, _, _ = await post(
                http, gateway, "/v1/chat/completions", raw, {**auth("openai", key), **FLOOD}
            )
            assert status == 200
        first, second = (json.loads(sent) for sent in sent_bodies(gateway))
        assert (first["max_tokens"], "max_completion_tokens" in first) == (MODEL_CAP, False)
        assert (second["max_tokens"], second["max_completion_tokens"]) == (5, 5)
    finally:
        await runner.cleanup()
