"""The gateway's HTTP surface, byte for byte: routes, auth, the protocol guard, error
envelopes and rate-limit headers (SPEC §1, §2, §3, §6, §7).

Raw aiohttp requests against a gateway on a real socket (the ``gateway`` fixture), so exact
status lines, headers and bodies are checked; every test runs on memory:// and real Redis.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from datetime import datetime
from typing import Any

import aiohttp
import pytest

from ratelimit_gw.limiter import Limiter

from .conftest import Gateway
from .http_helpers import Reply, auth, call

PROMPT = "Hello there, gateway!"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}
RESPONSES = {"model": "gpt-4o-mini", "input": PROMPT}
MESSAGES = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 100,
    "messages": [{"role": "user", "content": PROMPT}],
}
CONTENTS = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}
GEMINI = "gemini-2.5-flash"

# route name -> (protocol, path with query, body)
NATIVE_ROUTES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "chat": ("openai", "/v1/chat/completions", CHAT),
    "chat-stream": ("openai", "/v1/chat/completions", {**CHAT, "stream": True}),
    "responses": ("openai", "/v1/responses", RESPONSES),
    "responses-stream": ("openai", "/v1/responses", {**RESPONSES, "stream": True}),
    "messages": ("anthropic", "/v1/messages", MESSAGES),
    "messages-stream": ("anthropic", "/v1/messages", {**MESSAGES, "stream": True}),
    "v1beta-generate": ("gemini", f"/v1beta/models/{GEMINI}:generateContent", CONTENTS),
    "v1beta-stream": ("gemini", f"/v1beta/models/{GEMINI}:streamGenerateContent?alt=sse", CONTENTS),
    "v1-generate": ("gemini", f"/v1/models/{GEMINI}:generateContent", CONTENTS),
    "v1-stream": ("gemini", f"/v1/models/{GEMINI}:streamGenerateContent?alt=sse", CONTENTS),
}
# One route per protocol, for behaviour that is the same on every route of a protocol.
BY_PROTOCOL = {
    "openai": NATIVE_ROUTES["chat"],
    "anthropic": NATIVE_ROUTES["messages"],
    "gemini": NATIVE_ROUTES["v1beta-generate"],
}

GO_DURATION = re.compile(r"^(?:\d+ms|(?:\d+h)?(?:\d+m)?\d+(?:\.\d+)?s)$")
RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z$")
GENERATED_REQUEST_ID = re.compile(r"^req_[0-9a-f]{32}$")
GEMINI_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    402: "RESOURCE_EXHAUSTED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
}
ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_balance",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
}


async def key_id(gw: Gateway, secret: str) -> str:
    record = await gw.accounts.find_key(secret)
    assert record is not None
    return record.id


def assert_error_envelope(
    reply: Reply, protocol: str, status: int, reason: str, *, param: str | None = None
) -> str:
    """Check the §7 envelope of ``protocol`` exactly; return the message."""
    assert reply.status == status, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    document = reply.json()
    extra = {"rate_limit"} if status == 429 else set()
    if protocol == "openai":
        assert set(document) == {"error"}
        error = document["error"]
        assert set(error) == {"type", "code", "reason", "message", "param"} | extra
        assert error["param"] == param
        assert error["code"] == str(status)
    elif protocol == "anthropic":
        assert set(document) == {"type", "error", "request_id"}
        assert document["type"] == "error"
        assert document["request_id"] == reply.headers["x-request-id"]
        error = document["error"]
        assert set(error) == {"type", "code", "reason", "message"} | extra
        assert error["code"] == str(status)
    else:
        assert set(document) == {"error"}
        error = document["error"]
        assert set(error) == {"code", "status", "message", "type", "reason", "details"} | extra
        assert error["code"] == status
        assert error["status"] == GEMINI_STATUS[status]
        info = [d for d in error["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
        assert info and info[0]["reason"] == reason
    assert error["type"] == ERROR_TYPE[status]
    assert error["reason"] == reason
    assert isinstance(error["message"], str) and error["message"]
    message: str = error["message"]
    return message


def assert_request_headers(reply: Reply, limit: int, remaining: int) -> None:
    """The requests trio (OpenAI form) describes an rpm bucket of ``limit``."""
    headers = reply.headers
    assert headers["x-ratelimit-limit-requests"] == str(limit)
    assert headers["x-ratelimit-remaining-requests"] == str(remaining)
    assert GO_DURATION.match(headers["x-ratelimit-reset-requests"])


# --- §1 routes ------------------------------------------------------------------------


@pytest.mark.parametrize("route", NATIVE_ROUTES)
async def test_native_route_serves_its_own_protocol(
    gateway: Gateway, http: aiohttp.ClientSession, route: str
) -> None:
    protocol, path, body = NATIVE_ROUTES[route]
    key = await gateway.new_key()
    reply = await call(http, gateway, path, body, auth(protocol, key))
    assert reply.status == 200, reply.body
    text = reply.body.decode()
    assert "tok0" in text and "tok19" in text  # the mock's whole answer came through
    if route.endswith("stream"):
        assert reply.headers["Content-Type"].startswith("text/event-stream")
    else:
        assert reply.headers["Content-Type"].startswith("application/json")
        reply.json()
    upstream = gateway.upstream.state.requests[-1]
    assert upstream.method == "POST"
    assert upstream.path == path.partition("?")[0]


async def test_gemini_stream_without_alt_sse_is_a_json_array(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key()
    path = f"/v1beta/models/{GEMINI}:streamGenerateContent"
    reply = await call(http, gateway, path, CONTENTS, auth("gemini", key))
    assert reply.status == 200, reply.body
    chunks = reply.json()
    assert isinstance(chunks, list) and len(chunks) == 4
    assert chunks[-1]["usageMetadata"]["candidatesTokenCount"] == 20


async def test_model_list_has_the_documented_shape_sorted_and_filtered_by_key(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key(models=["gpt-*"])
    reply = await call(http, gateway, "/v1/models", None, auth("openai", key), method="GET")
    assert reply.status == 200, reply.body
    document = reply.json()
    assert set(document) == {"object", "data", "total", "has_more", "first_id", "last_id"}
    assert document["object"] == "list"
    assert [m["id"] for m in document["data"]] == ["gpt-4o", "gpt-4o-mini"]
    assert document["total"] == 2
    assert document["has_more"] is False
    assert (document["first_id"], document["last_id"]) == ("gpt-4o", "gpt-4o-mini")
    mini = document["data"][1]
    assert set(mini) == {
        "id",
        "object",
        "type",
        "display_name",
        "type_target",
        "created",
        "created_at",
        "owned_by",
        "pricing",
    }
    assert mini["object"] == "model" and mini["type"] == "model"
    assert mini["display_name"] == "gpt-4o-mini"
    assert mini["type_target"] == "openai"
    assert isinstance(mini["created"], int)
    assert RFC3339_Z.match(mini["created_at"])
    created_at = datetime.fromisoformat(mini["created_at"].replace("Z", "+00:00"))
    assert created_at.timestamp() == mini["created"]
    assert mini["owned_by"] == "mock-openai"
    assert mini["pricing"] == {"input_per_mtok": "0.15", "output_per_mtok": "0.60"}
    assert document["data"][0]["pricing"] == {"input_per_mtok": "2.50", "output_per_mtok": "10.00"}


async def test_model_list_answers_the_anthropic_sdk(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    # The Anthropic SDK lists models at GET /v1/models with x-api-key (§1.1, §2).
    key = await gateway.new_key(models=["claude-*"])
    reply = await call(http, gateway, "/v1/models", None, auth("anthropic", key), method="GET")
    assert reply.status == 200, reply.body
    document = reply.json()
    assert [m["id"] for m in document["data"]] == ["claude-sonnet-4-6"]
    assert document["data"][0]["type_target"] == "anthropic"


@pytest.mark.parametrize("how", ["header", "query"])
async def test_model_list_with_a_gemini_key_has_the_gemini_shape(
    gateway: Gateway, http: aiohttp.ClientSession, how: str
) -> None:
    key = await gateway.new_key()
    if how == "header":
        reply = await call(http, gateway, "/v1/models", None, auth("gemini", key), method="GET")
    else:
        reply = await call(http, gateway, f"/v1/models?key={key}", None, method="GET")
    assert reply.status == 200, reply.body
    document = reply.json()
    assert set(document) == {"models"}
    assert [m["name"] for m in document["models"]] == [
        "models/claude-sonnet-4-6",
        "models/gemini-2.5-flash",
        "models/gpt-4o",
        "models/gpt-4o-mini",
    ]
    assert all("generateContent" in m["supportedGenerationMethods"] for m in document["models"])


async def test_v1beta_model_list_names_models_with_their_prefix(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key(models=["gemini-*", "gpt-4o"])
    reply = await call(http, gateway, "/v1beta/models", None, auth("gemini", key), method="GET")
    assert reply.status == 200, reply.body
    assert [m["name"] for m in reply.json()["models"]] == [
        "models/gemini-2.5-flash",
        "models/gpt-4o",
    ]


# --- §2 authentication ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "how"),
    [
        ("openai", "bearer"),
        ("anthropic", "x-api-key"),
        ("anthropic", "bearer"),
        ("gemini", "x-goog-api-key"),
        ("gemini", "query"),
    ],
)
async def test_each_protocol_accepts_its_credential_forms(
    gateway: Gateway, http: aiohttp.ClientSession, protocol: str, how: str
) -> None:
    _, path, body = BY_PROTOCOL[protocol]
    key = await gateway.new_key()
    headers = {
        "bearer": {"Authorization": f"Bearer {key}"},
        "x-api-key": {"x-api-key": key},
        "x-goog-api-key": {"x-goog-api-key": key},
        "query": {},
    }[how]
    if how == "query":
        path += f"?key={key}"
    reply = await call(http, gateway, path, body, headers)
    assert reply.status == 200, reply.body


@pytest.mark.parametrize("version", ["2023-06-01", "2099-12-31", "whatever", None])
async def test_any_anthropic_version_is_accepted(
    gateway: Gateway, http: aiohttp.ClientSession, version: str | None
) -> None:
    key = await gateway.new_key()
    headers = {"x-api-key": key}
    if version is not None:
        headers["anthropic-version"] = version
    reply = await call(http, gateway, "/v1/messages", MESSAGES, headers)
    assert reply.status == 200, reply.body


@pytest.mark.parametrize("protocol", BY_PROTOCOL)
async def test_missing_key_is_401_in_the_routes_envelope(
    gateway: Gateway, http: aiohttp.ClientSession, protocol: str
) -> None:
    _, path, body = BY_PROTOCOL[protocol]
    reply = await call(http, gateway, path, body, {"anthropic-version": "2023-06-01"})
    message = assert_error_envelope(reply, protocol, 401, "missing_key")
    assert "API key" in message
    assert GENERATED_REQUEST_ID.match(reply.headers["x-request-id"])
    assert gateway.upstream.state.requests == []


@pytest.mark.parametrize("protocol", BY_PROTOCOL)
async def test_unknown_key_is_401_invalid_key(
    gateway: Gateway, http: aiohttp.ClientSession, protocol: str
) -> None:
    _, path, body = BY_PROTOCOL[protocol]
    await gateway.new_key()
    for secret in ("rlgw-not-a-real-key-at-all-000000000000000", "sk-some-openai-key"):
        reply = await call(http, gateway, path, body, auth(protocol, secret))
        assert_error_envelope(reply, protocol, 401, "invalid_key")
        assert "x-ratelimit-limit-requests" not in reply.headers
    assert gateway.upstream.state.requests == []


async def test_revoked_key_is_401_key_revoked(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key()
    first = await call(http, gateway, "/v1/chat/completions", CHAT, auth("openai", key))
    assert first.status == 200
    await gateway.accounts.revoke_key(await key_id(gateway, key))
    reply = await call(http, gateway, "/v1/chat/completions", CHAT, auth("openai", key))
    assert_error_envelope(reply, "openai", 401, "key_revoked")
    assert len(gateway.upstream.state.requests) == 1


# --- §3 model resolution and the protocol guard ---------------------------------------


@pytest.mark.parametrize(
    ("protocol", "path", "body", "model", "converter"),
    [
        (
            "openai",
            "/v1/chat/completions",
            {**CHAT, "model": "claude-sonnet-4-6"},
            "claude-sonnet-4-6",
            "/openai/v1/chat/completions",
        ),
        (
            "openai",
            "/v1/responses",
            {**RESPONSES, "model": GEMINI},
            GEMINI,
            "/openai/v1/chat/completions",
        ),
        (
            "anthropic",
            "/v1/messages",
            {**MESSAGES, "model": "gpt-4o"},
            "gpt-4o",
            "/anthropic/v1/messages",
        ),
        (
            "gemini",
            "/v1beta/models/gpt-4o-mini:generateContent",
            CONTENTS,
            "gpt-4o-mini",
            "/gemini/v1beta/models/gpt-4o-mini:generateContent",
        ),
    ],
)
async def test_model_of_another_protocol_is_400_naming_the_converter_route(
    gateway: Gateway,
    http: aiohttp.ClientSession,
    protocol: str,
    path: str,
    body: dict[str, Any],
    model: str,
    converter: str,
) -> None:
    key = await gateway.new_key(rpm=10)
    reply = await call(http, gateway, path, body, auth(protocol, key))
    param = "model" if protocol == "openai" else None
    message = assert_error_envelope(reply, protocol, 400, "protocol_mismatch", param=param)
    assert f"`{model}`" in message
    assert f"Use the converter route {converter} " in message
    assert_request_headers(reply, 10, 10)
    assert gateway.upstream.state.requests == []


@pytest.mark.parametrize("protocol", BY_PROTOCOL)
async def test_unknown_model_is_404_with_suggestions(
    gateway: Gateway, http: aiohttp.ClientSession, protocol: str
) -> None:
    _, path, body = BY_PROTOCOL[protocol]
    if protocol == "gemini":
        path = "/v1beta/models/gpt-4o-mni:generateContent"
    else:
        body = {**body, "model": "gpt-4o-mni"}
    key = await gateway.new_key()
    reply = await call(http, gateway, path, body, auth(protocol, key))
    message = assert_error_envelope(
        reply, protocol, 404, "model_not_found", param="model" if protocol == "openai" else None
    )
    assert "`gpt-4o-mni`" in message
    hint = message.partition("Did you mean: ")[2]
    assert hint.endswith("?")
    suggestions = hint[:-1].split(", ")
    assert suggestions[0] == "gpt-4o-mini"
    assert 1 <= len(suggestions) <= 3
    assert "claude-sonnet-4-6" not in suggestions


async def test_unknown_model_without_close_match_has_no_suggestion(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key()
    body = {**CHAT, "model": "zzzzzzzz"}
    reply = await call(http, gateway, "/v1/chat/completions", body, auth("openai", key))
    message = assert_error_envelope(reply, "openai", 404, "model_not_found", param="model")
    assert "Did you mean" not in message


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
async def test_missing_model_is_400(
    gateway: Gateway, http: aiohttp.ClientSession, protocol: str
) -> None:
    _, path, body = BY_PROTOCOL[protocol]
    body = {k: v for k, v in body.items() if k != "model"}
    key = await gateway.new_key()
    reply = await call(http, gateway, path, body, auth(protocol, key))
    param = "model" if protocol == "openai" else None
    message = assert_error_envelope(reply, protocol, 400, "missing_model", param=param)
    assert "model" in message


@pytest.mark.parametrize("protocol", BY_PROTOCOL)
@pytest.mark.parametrize("body", [b'{"model": "gpt-4o-mini",', b"not json", b""])
async def test_invalid_json_is_400_invalid_json(
    gateway: Gateway, http: aiohttp.ClientSession, protocol: str, body: bytes
) -> None:
    _, path, _ = BY_PROTOCOL[protocol]
    key = await gateway.new_key()
    reply = await call(http, gateway, path, body, auth(protocol, key))
    assert_error_envelope(reply, protocol, 400, "invalid_json")
    assert gateway.upstream.state.requests == []


@pytest.mark.parametrize("protocol", BY_PROTOCOL)
@pytest.mark.parametrize("body", [b"[]", b'"text"', b"42", b"null"])
async def test_body_that_is_not_an_object_is_400(
    gateway: Gateway, http: aiohttp.ClientSession, protocol: str, body: bytes
) -> None:
    _, path, _ = BY_PROTOCOL[protocol]
    key = await gateway.new_key()
    reply = await call(http, gateway, path, body, auth(protocol, key))
    message = assert_error_envelope(reply, protocol, 400, "invalid_json")
    assert "object" in message
    assert gateway.upstream.state.requests == []


@pytest.mark.parametrize(
    ("method", "path", "protocol"),
    [
        ("GET", "/v1/chat/completions", "openai"),
        ("PUT", "/v1/responses", "openai"),
        ("GET", "/v1/messages", "anthropic"),
        ("DELETE", "/v1/models", "openai"),
    ],
)
async def test_wrong_method_is_405_invalid_request_error(
    gateway: Gateway, http: aiohttp.ClientSession, method: str, path: str, protocol: str
) -> None:
    key = await gateway.new_key()
    reply = await call(http, gateway, path, None, auth(protocol, key), method=method)
    assert_error_envelope(reply, protocol, 405, "method_not_allowed")
    allowed = {m.strip() for m in reply.headers["Allow"].split(",")}
    assert allowed == ({"GET", "HEAD"} if path == "/v1/models" else {"POST"})


async def test_unknown_route_is_404_naming_the_method_and_path(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key()
    reply = await call(http, gateway, "/v1/chat/complete", CHAT, auth("openai", key))
    message = assert_error_envelope(reply, "openai", 404, "route_not_found")
    assert message.startswith("No route for POST /v1/chat/complete: this gateway serves ")


@pytest.mark.parametrize("protocol", BY_PROTOCOL)
async def test_model_the_key_may_not_use_is_403(
    gateway: Gateway, http: aiohttp.ClientSession, protocol: str
) -> None:
    _, path, body = BY_PROTOCOL[protocol]
    key = await gateway.new_key(models=["gpt-4o"], rpm=10)  # not gpt-4o-mini, nor the others
    reply = await call(http, gateway, path, body, auth(protocol, key))
    param = "model" if protocol == "openai" else None
    message = assert_error_envelope(reply, protocol, 403, "model_not_allowed", param=param)
    assert "may not use" in message
    assert_request_headers(reply, 10, 10)
    assert gateway.upstream.state.requests == []


# --- §7 429 / 402 bodies and §6 retry headers -----------------------------------------


@pytest.mark.parametrize("protocol", BY_PROTOCOL)
async def test_rpm_429_states_the_limit_and_the_real_wait(
    gateway: Gateway, http: aiohttp.ClientSession, protocol: str
) -> None:
    _, path, body = BY_PROTOCOL[protocol]
    key = await gateway.new_key(rpm=2)
    headers = auth(protocol, key)
    first_sent = time.monotonic()
    first = await call(http, gateway, path, body, headers)
    first_done = time.monotonic()
    assert first.status == 200
    assert (await call(http, gateway, path, body, headers)).status == 200
    third_sent = time.monotonic()
    reply = await call(http, gateway, path, body, headers)
    third_done = time.monotonic()

    message = assert_error_envelope(reply, protocol, 429, "rpm_exceeded")
    assert "Your current limit is 2 requests per minute" in message
    assert reply.error()["rate_limit"] == {"rpm": 2, "qps": pytest.approx(2 / 60), "tpm": None}

    # Two of two requests used: the bucket holds what refilled since the first admission
    # (2 per 60 s), so the third passes once one whole request has refilled.
    wait_ms = int(reply.headers["retry-after-ms"])
    longest_elapsed_ms = (third_done - first_sent) * 1000
    shortest_elapsed_ms = (third_sent - first_done) * 1000
    assert 30_000 - longest_elapsed_ms - 2 <= wait_ms <= 30_000 - shortest_elapsed_ms + 2
    assert reply.headers["retry-after"] == str(max(1, math.ceil(wait_ms / 1000)))
    assert reply.headers.get("x-should-retry") != "false"  # waiting does cure this one
    assert_request_headers(reply, 2, 0)
    assert len(gateway.upstream.state.requests) == 2

    if protocol == "gemini":
        details = reply.error()["details"]
        retry = [d for d in details if d["@type"] == "type.googleapis.com/google.rpc.RetryInfo"]
        assert len(retry) == 1
        delay = retry[0]["retryDelay"]
        assert re.match(r"^\d+(\.\d{3})?s$", delay)
        assert round(float(delay[:-1]) * 1000) == wait_ms


@pytest.mark.parametrize(
    ("rpm", "stated"),
    [
        (60, "60 requests per minute (approximately 1 request per second)"),
        (1, "1 request per minute (approximately 0.0167 requests per second)"),
    ],
)
async def test_rpm_429_says_request_or_requests_as_english_does(
    gateway: Gateway, http: aiohttp.ClientSession, rpm: int, stated: str
) -> None:
    key = await gateway.new_key(rpm=rpm)
    headers = auth("openai", key)
    for _ in range(rpm):
        assert (await call(http, gateway, "/v1/chat/completions", CHAT, headers)).status == 200
    reply = await call(http, gateway, "/v1/chat/completions", CHAT, headers)
    message = assert_error_envelope(reply, "openai", 429, "rpm_exceeded")
    assert message.startswith(f"Rate limit exceeded. Your current limit is {stated}. Please")


@pytest.mark.parametrize("protocol", BY_PROTOCOL)
async def test_tpm_429_states_the_token_limit(
    gateway: Gateway, http: aiohttp.ClientSession, protocol: str
) -> None:
    _, path, body = BY_PROTOCOL[protocol]
    raw = json.dumps(_with_output_cap(protocol, body, 20)).encode()
    estimate = math.ceil(len(raw) / 4) + 20
    # Room for one estimate plus 10 tokens: even after settlement refunds the first
    # request's unused estimate, its real usage (> 10 tokens) leaves too little.
    tpm = estimate + 10
    key = await gateway.new_key(tpm=tpm)
    headers = auth(protocol, key)
    first = await call(http, gateway, path, raw, headers)
    assert first.status == 200
    assert first.headers["x-ratelimit-remaining-tokens"] == "10"
    reply = await call(http, gateway, path, raw, headers)
    message = assert_error_envelope(reply, protocol, 429, "tpm_exceeded")
    assert f"Your current limit is {tpm} tokens per minute" in message
    assert f"needs an estimated {estimate} tokens" in message
    assert reply.error()["rate_limit"] == {"rpm": None, "qps": None, "tpm": tpm}
    wait_ms = int(reply.headers["retry-after-ms"])
    assert 0 < wait_ms <= math.ceil(estimate * 60_000 / tpm)
    assert reply.headers["retry-after"] == str(max(1, math.ceil(wait_ms / 1000)))
    assert reply.headers["x-ratelimit-limit-tokens"] == str(tpm)
    assert len(gateway.upstream.state.requests) == 1


@pytest.mark.parametrize("protocol", BY_PROTOCOL)
async def test_request_larger_than_the_token_limit_is_429_should_not_retry(
    gateway: Gateway, http: aiohttp.ClientSession, protocol: str
) -> None:
    _, path, body = BY_PROTOCOL[protocol]
    key = await gateway.new_key(tpm=100, rpm=10)
    reply = await call(
        http, gateway, path, _with_output_cap(protocol, body, 500), auth(protocol, key)
    )
    message = assert_error_envelope(reply, protocol, 429, "request_exceeds_limit")
    assert "limit of 100 tokens per minute" in message
    assert reply.headers["x-should-retry"] == "false"
    assert reply.error()["rate_limit"] == {"rpm": 10, "qps": pytest.approx(10 / 60), "tpm": 100}
    assert gateway.upstream.state.requests == []
    # Nothing consumed: the full buckets are reported on the next answer.
    assert_request_headers(reply, 10, 10)
    assert reply.headers["x-ratelimit-remaining-tokens"] == "100"


@pytest.mark.parametrize("protocol", BY_PROTOCOL)
async def test_insufficient_balance_is_402_should_not_retry(
    gateway: Gateway, http: aiohttp.ClientSession, protocol: str
) -> None:
    _, path, body = BY_PROTOCOL[protocol]
    key = await gateway.new_key(balance_usd="0.000010", rpm=10)
    reply = await call(http, gateway, path, body, auth(protocol, key))
    message = assert_error_envelope(reply, protocol, 402, "balance_exceeded", param=None)
    assert "$0.00001 available" in message
    assert "output tokens" in message
    assert reply.headers["x-should-retry"] == "false"
    assert "retry-after" not in reply.headers
    assert_request_headers(reply, 10, 10)
    assert gateway.upstream.state.requests == []


def _with_output_cap(protocol: str, body: dict[str, Any], cap: int) -> dict[str, Any]:
    if protocol == "gemini":
        return {**body, "generationConfig": {"maxOutputTokens": cap}}
    return {**body, "max_tokens": cap}


# --- §6 headers -----------------------------------------------------------------------


@pytest.mark.parametrize("route", ["chat", "responses-stream", "messages", "v1beta-stream"])
async def test_success_carries_rate_limit_headers_in_every_form(
    gateway: Gateway, http: aiohttp.ClientSession, route: str
) -> None:
    protocol, path, body = NATIVE_ROUTES[route]
    key = await gateway.new_key(rpm=10, tpm=100_000)
    raw = json.dumps(body).encode()
    reply = await call(http, gateway, path, raw, auth(protocol, key))
    assert reply.status == 200, reply.body
    h = reply.headers

    # One request out of a full bucket of 10: 9 left, full again in 60 s / 10 = 6 s.
    assert_request_headers(reply, 10, 9)
    assert h["x-ratelimit-reset-requests"] == "6s"
    # Admission charges the estimate: ceil(body bytes / 4) + the output cap.
    cap = body.get("max_tokens", 1000)
    estimate = math.ceil(len(raw) / 4) + cap
    assert h["x-ratelimit-limit-tokens"] == "100000"
    assert h["x-ratelimit-remaining-tokens"] == str(100_000 - estimate)
    assert GO_DURATION.match(h["x-ratelimit-reset-tokens"])
    reset_tokens_ms = math.ceil(estimate * 60_000 / 100_000)
    assert h["x-ratelimit-reset-tokens"] == f"{reset_tokens_ms}ms"

    assert h["RateLimit-Policy"] == '"rpm";q=10;w=60, "tpm";q=100000;w=60'
    assert h["RateLimit"] == f'"rpm";r=9;t=6, "tpm";r={100_000 - estimate};t=1'
    assert GENERATED_REQUEST_ID.match(h["x-request-id"])

    if protocol == "anthropic":
        assert h["request-id"] == h["x-request-id"]
        assert h["anthropic-ratelimit-requests-limit"] == "10"
        assert h["anthropic-ratelimit-requests-remaining"] == "9"
        assert h["anthropic-ratelimit-tokens-limit"] == "100000"
        assert h["anthropic-ratelimit-tokens-remaining"] == str(100_000 - estimate)
        now = time.time()
        for name, seconds in (("requests", 6), ("tokens", 1)):
            value = h[f"anthropic-ratelimit-{name}-reset"]
            assert RFC3339_Z.match(value), value
            moment = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            assert now - 2 <= moment <= now + seconds + 1
    else:
        assert not [name for name in h if name.lower().startswith("anthropic-ratelimit-")]
        assert "request-id" not in h


async def test_token_headers_only_when_a_token_limit_applies(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key(rpm=10)
    reply = await call(http, gateway, "/v1/messages", MESSAGES, auth("anthropic", key))
    assert reply.status == 200
    assert_request_headers(reply, 10, 9)
    assert not [name for name in reply.headers if "tokens" in name.lower()]
    assert reply.headers["RateLimit-Policy"] == '"rpm";q=10;w=60'
    assert reply.headers["RateLimit"] == '"rpm";r=9;t=6'


async def test_account_limits_are_reported_when_tighter_than_the_key(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key(rpm=100, account_rpm=5)
    reply = await call(http, gateway, "/v1/chat/completions", CHAT, auth("openai", key))
    assert_request_headers(reply, 5, 4)


async def test_concurrency_limit_appears_in_the_ietf_headers(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key(rpm=10, concurrency=3)
    reply = await call(http, gateway, "/v1/chat/completions", CHAT, auth("openai", key))
    assert reply.status == 200
    policy = reply.headers["RateLimit-Policy"]
    assert '"concurrency";q=3;qu="concurrent-requests"' in policy
    # The request itself held one of three slots while its answer was written.
    assert '"concurrency";r=2' in reply.headers["RateLimit"]


@pytest.mark.parametrize("protocol", BY_PROTOCOL)
async def test_remaining_requests_decrease_by_exactly_one_per_request(
    gateway: Gateway, http: aiohttp.ClientSession, protocol: str
) -> None:
    _, path, body = BY_PROTOCOL[protocol]
    key = await gateway.new_key(rpm=10)
    seen = []
    for _ in range(4):
        reply = await call(http, gateway, path, body, auth(protocol, key))
        assert reply.status == 200
        seen.append(int(reply.headers["x-ratelimit-remaining-requests"]))
    assert seen == [9, 8, 7, 6]


@pytest.mark.parametrize("protocol", BY_PROTOCOL)
async def test_client_request_id_is_echoed_else_one_is_generated(
    gateway: Gateway, http: aiohttp.ClientSession, protocol: str
) -> None:
    _, path, body = BY_PROTOCOL[protocol]
    key = await gateway.new_key()
    mine = {**auth(protocol, key), "x-request-id": "trace-42.abc_DEF"}
    echoed = await call(http, gateway, path, body, mine)
    assert echoed.headers["x-request-id"] == "trace-42.abc_DEF"
    first = await call(http, gateway, path, body, auth(protocol, key))
    second = await call(http, gateway, path, body, auth(protocol, key))
    ids = {first.headers["x-request-id"], second.headers["x-request-id"]}
    assert len(ids) == 2 and all(GENERATED_REQUEST_ID.match(i) for i in ids)
    # On errors too, and in the Anthropic envelope.
    bad = await call(http, gateway, path, b"{", mine)
    assert bad.headers["x-request-id"] == "trace-42.abc_DEF"
    if protocol == "anthropic":
        assert echoed.headers["request-id"] == "trace-42.abc_DEF"
        assert bad.json()["request_id"] == "trace-42.abc_DEF"


@pytest.mark.parametrize("bad_id", ["has space", "x" * 129])
async def test_unusable_client_request_id_is_replaced(
    gateway: Gateway, http: aiohttp.ClientSession, bad_id: str
) -> None:
    key = await gateway.new_key()
    headers = {**auth("openai", key), "x-request-id": bad_id}
    reply = await call(http, gateway, "/v1/chat/completions", CHAT, headers)
    assert GENERATED_REQUEST_ID.match(reply.headers["x-request-id"])


# --- §6 pre-admission errors: headers, nothing consumed --------------------------------


async def wait_settled(gw: Gateway, account: str = "acme") -> None:
    """Wait (bounded) until no hold is live: every admitted request has settled."""
    deadline = time.monotonic() + 5
    while True:
        state = await gw.accounts.get_account(account)
        if state.holds_live == 0 and state.held_usd == "0.00":
            return
        assert time.monotonic() < deadline, f"settlement did not finish: {state}"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("protocol", BY_PROTOCOL)
async def test_rejection_before_admission_reports_limits_and_consumes_nothing(
    gateway: Gateway, http: aiohttp.ClientSession, protocol: str
) -> None:
    _, path, body = BY_PROTOCOL[protocol]
    key = await gateway.new_key(rpm=10, tpm=50_000, concurrency=2, balance_usd="1.00")
    headers = auth(protocol, key)
    ok = await call(http, gateway, path, body, headers)
    assert ok.status == 200
    assert_request_headers(ok, 10, 9)
    await wait_settled(gateway)
    balance = (await gateway.accounts.get_account("acme")).balance_usd
    ledger_size = len(await gateway.accounts.ledger("acme"))

    if protocol == "gemini":
        unknown = ("/v1beta/models/no-such-model:generateContent", body)
        mismatch = ("/v1beta/models/gpt-4o:generateContent", body)
    else:
        unknown = (path, {**body, "model": "no-such-model"})
        mismatch = (path, {**body, "model": GEMINI})
    rejected = [
        await call(http, gateway, *unknown, headers),
        await call(http, gateway, *mismatch, headers),
        await call(http, gateway, path, b"{oops", headers),
        await call(http, gateway, path, b"[]", headers),
    ]
    assert [r.status for r in rejected] == [404, 400, 400, 400]
    for reply in rejected:
        assert_request_headers(reply, 10, 9)
        assert reply.headers["x-ratelimit-limit-tokens"] == "50000"
        assert GENERATED_REQUEST_ID.match(reply.headers["x-request-id"])
        assert reply.headers["RateLimit-Policy"] == (
            '"rpm";q=10;w=60, "tpm";q=50000;w=60, "concurrency";q=2;qu="concurrent-requests"'
        )
        assert '"concurrency";r=2' in reply.headers["RateLimit"]

    account = await gateway.accounts.get_account("acme")
    assert (account.balance_usd, account.held_usd, account.holds_live) == (balance, "0.00", 0)
    assert len(await gateway.accounts.ledger("acme")) == ledger_size
    second = await call(http, gateway, path, body, headers)
    assert second.status == 200
    assert_request_headers(second, 10, 8)
    assert len(gateway.upstream.state.requests) == 2


async def test_rate_limited_request_consumes_nothing(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key(rpm=1, account_tpm=100_000, concurrency=1, balance_usd="1.00")
    headers = auth("openai", key)
    assert (await call(http, gateway, "/v1/chat/completions", CHAT, headers)).status == 200
    await wait_settled(gateway)
    limiter = Limiter(gateway.storage)
    kid = await key_id(gateway, key)
    before = await limiter.peek("acme", kid)
    balance = (await gateway.accounts.get_account("acme")).balance_usd
    for _ in range(3):
        reply = await call(http, gateway, "/v1/chat/completions", CHAT, headers)
        assert reply.status == 429
        assert reply.error()["reason"] == "rpm_exceeded"
    after = await limiter.peek("acme", kid)
    assert before.requests is not None and after.requests is not None
    assert before.tokens is not None and after.tokens is not None
    assert after.requests.remaining == before.requests.remaining == 0
    # Tokens only refill (100000/min) while rejected requests are turned away.
    assert before.tokens.remaining <= after.tokens.remaining <= before.tokens.remaining + 100
    assert after.concurrency_in_use == before.concurrency_in_use == 0
    account = await gateway.accounts.get_account("acme")
    assert (account.balance_usd, account.held_usd, account.holds_live) == (balance, "0.00", 0)
    assert len(gateway.upstream.state.requests) == 1
