"""Custom endpoints and gateway keys (issue 17, item 7).

A key restricted to some models reaches, through ``/proxy-api``, only those models: it may
send body-less requests and JSON bodies naming an allowed ``model``; any other body is a 403.
A query parameter carrying a gateway key never reaches an upstream, on any route; a path
segment like ``..;`` is refused like ``..``. The gateway is the one of test_proxy_api.py
(endpoint ``pipeshift/model`` on the mock upstream); every test runs on memory:// and Redis.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from yarl import URL

from ratelimit_gw.storage import Storage

from .conftest import Gateway, Upstream
from .test_proxy_api import CHAT_PATH, MESSAGES, OPEN_MODEL, proxy_gateway, upstream_calls

RESTRICTED = ["gpt-4o-mini"]


@pytest.fixture
async def gw(upstream: Upstream, storage: Storage) -> AsyncIterator[Gateway]:
    async with proxy_gateway(upstream, storage) as gateway:
        yield gateway


async def send(
    gw: Gateway,
    key: str,
    body: bytes | None,
    *,
    method: str = "POST",
    path: str = CHAT_PATH,
    content_type: str = "application/json",
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": content_type}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, URL(gw.url + path, encoded=True), data=body, headers=headers) as r,
    ):
        return r.status, await r.json(content_type=None)


def chat_body(model: str) -> bytes:
    return json.dumps({"model": model, "messages": MESSAGES}).encode()


# --- a key's model allow-list -------------------------------------------------------------------


async def test_a_restricted_key_reaches_only_its_models_through_a_custom_endpoint(
    gw: Gateway,
) -> None:
    key = await gw.new_key(models=RESTRICTED)
    # A model no [[models]] entry names: it used to pass at the flat per-request price.
    status, body = await send(gw, key, chat_body(OPEN_MODEL))
    assert status == 403
    assert body["error"] == {
        "type": "permission_error",
        "code": "403",
        "reason": "model_not_allowed",
        "message": f"This API key may not use the model `{OPEN_MODEL}`.",
        "param": "model",
    }
    assert upstream_calls(gw) == []

    assert (await send(gw, key, chat_body("gpt-4o-mini")))[0] == 200
    status, listing = await send(
        gw, key, None, method="GET", path=CHAT_PATH[: -len("/chat/completions")] + "/models"
    )
    assert (status, listing["object"]) == (200, "list")
    assert [(r.method, r.path) for r in upstream_calls(gw)] == [
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
    ]


OPAQUE_BODIES = {
    "json without a model": (b'{"messages": []}', "application/json"),
    "a model that is not a string": (b'{"model": ["gpt-4o-mini"]}', "application/json"),
    "not JSON": (b'{"model": "gpt-4o-mini"', "application/json"),
    "a JSON array": (b'[{"model": "gpt-4o-mini"}]', "application/json"),
    "a form": (b"model=gpt-4o-mini", "application/x-www-form-urlencoded"),
    "multipart": (
        b'--b0\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o-mini\r\n--b0--\r\n',
        "multipart/form-data; boundary=b0",
    ),
}


@pytest.mark.parametrize("kind", OPAQUE_BODIES)
async def test_a_restricted_key_may_not_send_a_body_that_names_no_allowed_model(
    gw: Gateway, kind: str
) -> None:
    body, content_type = OPAQUE_BODIES[kind]
    restricted = await gw.new_key("acme", models=RESTRICTED)
    status, answer = await send(gw, restricted, body, content_type=content_type)
    assert (status, answer["error"]["reason"]) == (403, "model_not_allowed")
    assert "must be a JSON object whose `model` is one of them" in answer["error"]["message"]
    assert upstream_calls(gw) == []
    # A key without a model list sends the same body on, untouched.
    unrestricted = await gw.new_key("other")
    status, _ = await send(gw, unrestricted, body, content_type=content_type)
    assert status != 403
    assert [r.body for r in upstream_calls(gw)] == [body]


# --- gateway keys in query parameters ----------------------------------------------------------


async def test_a_query_parameter_carrying_a_gateway_key_is_never_forwarded(gw: Gateway) -> None:
    key = await gw.new_key("acme")
    another = await gw.new_key("other")
    query = "&".join(
        [
            "limit=2",
            f"key={key}",  # the caller's own key, Gemini-style
            f"api_key={quote(another, safe='')}",  # someone else's
            "token=" + "".join(f"%{b:02X}" for b in key.encode()),  # fully percent-encoded
            f"trace=+{key}",  # "+" is a space: still the key
            f"{key}=1",  # as a name
            "key=upstream-own-key",  # the upstream's own key passes
            "q=a%20b",
        ]
    )
    path = CHAT_PATH[: -len("/chat/completions")] + "/models?" + query
    status, _ = await send(gw, key, None, method="GET", path=path)
    assert status == 200
    [seen] = upstream_calls(gw)
    assert seen.query_string == "limit=2&key=upstream-own-key&q=a b"


async def test_a_gemini_route_forwards_no_gateway_key_under_any_name(gw: Gateway) -> None:
    key = await gw.new_key("acme")
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    url = f"{gw.url}/v1beta/models/gemini-2.5-flash:generateContent"
    params = {"key": key, "trace": key, "alt": "json"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, params=params, json=body) as response,
    ):
        assert response.status == 200
    [seen] = upstream_calls(gw)
    assert seen.query_string == "alt=json"


# --- path segments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "suffix", ["v1/..;/admin", "v1/..;x=1/admin", "v1/.;/models", "v1/%2e%2e%3B/admin", "..;"]
)
async def test_dot_segments_with_parameters_are_refused(gw: Gateway, suffix: str) -> None:
    key = await gw.new_key()
    status, body = await send(
        gw, key, None, method="GET", path=f"/proxy-api/pipeshift/model/{suffix}"
    )
    assert (status, body["error"]["reason"]) == (400, "invalid_request")
    assert upstream_calls(gw) == []
