"""Raw HTTP against a test gateway: the credential each protocol's SDK sends, and one call
that keeps the exact status, headers and body of the reply."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from .conftest import Gateway


def auth(protocol: str, key: str) -> dict[str, str]:
    """The credential header each protocol's SDK sends."""
    if protocol == "anthropic":
        return {"x-api-key": key, "anthropic-version": "2023-06-01"}
    if protocol == "gemini":
        return {"x-goog-api-key": key}
    return {"Authorization": f"Bearer {key}"}


class Reply:
    def __init__(self, status: int, headers: CIMultiDictProxy[str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> dict[str, Any]:
        """The inner error object of any protocol's envelope."""
        document = self.json()
        assert isinstance(document["error"], dict)
        return document["error"]


async def call(
    http: aiohttp.ClientSession,
    gw: Gateway,
    path: str,
    body: bytes | dict[str, Any] | list[Any] | None = None,
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> Reply:
    """One request (a dict or list body sent as JSON; any body as application/json unless
    ``headers`` say otherwise), its reply read whole."""
    data = json.dumps(body).encode() if isinstance(body, dict | list) else body
    send = dict(headers or {})
    if data is not None:
        send.setdefault("Content-Type", "application/json")
    async with http.request(method, gw.url + path, data=data, headers=send) as resp:
        return Reply(resp.status, resp.headers, await resp.read())
