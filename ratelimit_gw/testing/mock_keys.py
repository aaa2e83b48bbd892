"""The mock upstream's per-credential behaviour: how it answers each upstream API key.

A gateway with a pool of upstream keys is tested against one mock where some keys are rate
limited, revoked or slow and others answer normally. A :class:`KeyBehaviour` set for a
credential applies to every request that credential sends, on every route (the model lists
included, so a health probe of a revoked key fails too), until it is cleared. The same
:class:`KeyBook` is changed in-process or over HTTP (:func:`key_routes`), since the gateway
under test may run in other processes.

The book also counts the requests of each credential, so a test can tell which keys a
gateway tried. Per request it costs one counter update, and one dict lookup while any
behaviour is set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import msgspec
from aiohttp import web

from .mock_wire import Protocol

_Status = Annotated[int, msgspec.Meta(ge=400, le=599)]
_NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
_NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


class KeyBehaviour(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How the mock answers one credential. The defaults answer normally.

    ``latency_ms`` is waited before anything else (it adds to ``x-mock-latency-ms``). A
    ``status`` is then answered instead of the route's reply, in the route's protocol error
    shape, with the retry hint: ``retry_after_s`` as ``retry-after``, ``retry_after_ms`` as
    ``retry-after-ms`` (each only when given) and, on a Gemini 429, a
    ``google.rpc.RetryInfo`` detail whose ``retryDelay`` is the hint (the milliseconds when
    given, else the seconds). ``retry_headers=False`` leaves the headers out, as the real
    Gemini API does: the hint is then only in the RetryInfo.
    """

    status: _Status | None = None
    retry_after_s: _NonNegativeInt | None = None
    retry_after_ms: _NonNegativeInt | None = None
    latency_ms: _NonNegativeFloat = 0.0
    retry_headers: bool = True

    def __post_init__(self) -> None:
        # msgspec checks the Meta bounds only when decoding JSON: the same rules for a
        # behaviour built in-process. Raised as a ValidationError when decoding.
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError("status must be an HTTP error status (400-599)")
        for name in ("retry_after_s", "retry_after_ms"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")
        if not self.latency_ms >= 0:  # also rejects NaN
            raise ValueError("latency_ms must be >= 0")

    @property
    def retry_delay_ms(self) -> int | None:
        """The hint as one number of milliseconds (for Gemini's RetryInfo)."""
        if self.retry_after_ms is not None:
            return self.retry_after_ms
        return None if self.retry_after_s is None else self.retry_after_s * 1000

    def hint_headers(self) -> dict[str, str]:
        if not self.retry_headers:
            return {}
        headers = {}
        if self.retry_after_s is not None:
            headers["retry-after"] = str(self.retry_after_s)
        if self.retry_after_ms is not None:
            headers["retry-after-ms"] = str(self.retry_after_ms)
        return headers


_decode_behaviour = msgspec.json.Decoder(KeyBehaviour).decode
_encode = msgspec.json.Encoder().encode


def credential_of(protocol: Protocol, headers: Mapping[str, str], query: Mapping[str, str]) -> str:
    """The upstream credential a request carries, in its protocol's place ("" when none):
    ``Authorization: Bearer`` (OpenAI), ``x-api-key`` (Anthropic), ``x-goog-api-key`` or
    ``?key=`` (Gemini)."""
    if protocol == "anthropic":
        return headers.get("x-api-key", "")
    if protocol == "gemini":
        return headers.get("x-goog-api-key") or query.get("key", "")
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class KeyBook:
    """The behaviour set for each credential, and the requests each credential sent."""

    def __init__(self) -> None:
        self._behaviours: dict[str, KeyBehaviour] = {}
        self._requests: dict[str, int] = {}

    def set(self, credential: str, behaviour: KeyBehaviour) -> None:
        self._behaviours[credential] = behaviour

    def clear(self, credential: str) -> None:
        """Answer the credential normally again (a no-op when nothing is set)."""
        self._behaviours.pop(credential, None)

    @property
    def behaviours(self) -> dict[str, KeyBehaviour]:
        return dict(self._behaviours)

    @property
    def requests(self) -> dict[str, int]:
        """Requests per credential since start-up (those without a credential are not here)."""
        return dict(self._requests)

    def on_request(self, credential: str) -> KeyBehaviour | None:
        """Count one request of ``credential``; return its behaviour, if one is set."""
        if credential:
            self._requests[credential] = self._requests.get(credential, 0) + 1
        # The usual benchmark run sets no behaviour: skip even the lookup then.
        return self._behaviours.get(credential) if self._behaviours else None


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(body=_encode(body), status=status, content_type="application/json")


def key_routes(book: KeyBook) -> list[web.RouteDef]:
    """``GET /mock/keys`` lists the behaviours set; ``PUT /mock/keys/{credential}`` sets one
    from a JSON object with :class:`KeyBehaviour`'s fields (answered with the behaviour
    stored, or 400 naming the bad field); ``DELETE /mock/keys/{credential}`` clears one (204)."""

    async def list_keys(request: web.Request) -> web.Response:
        return _json(book.behaviours)

    async def put_key(request: web.Request) -> web.Response:
        try:
            behaviour = _decode_behaviour(await request.read())
        except msgspec.DecodeError as err:
            return _json({"error": f"invalid key behaviour: {err}"}, status=400)
        book.set(request.match_info["credential"], behaviour)
        return _json(behaviour)

    async def delete_key(request: web.Request) -> web.Response:
        book.clear(request.match_info["credential"])
        return web.Response(status=204)

    return [
        web.get("/mock/keys", list_keys),
        web.put("/mock/keys/{credential}", put_key),
        web.delete("/mock/keys/{credential}", delete_key),
    ]
