"""The upstream call: credentials swapped, bytes forwarded, answers buffered or streamed.

One pooled :class:`~ratelimit_gw.upstream_client.UpstreamClient` per process. The relay never
decides limits; it reports what happened (a :class:`RelayResult`) and the gateway settles from
that. Streams go to the client event by event as they arrive while a protocol tap reads the
usage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from .client_headers import HOP_BY_HOP, ClientHeaderPolicy
from .errors import GatewayError
from .keys import KEY_PREFIX
from .metrics import Metrics, labelled
from .protocols import (
    FAMILY_HEADER_PREFIXES,
    OWN_HEADER_NAMES,
    OWN_HEADER_PREFIXES,
    ProtocolAdapter,
    StreamTap,
    Usage,
)
from .protocols.translation.relaying import AnswerTranslation
from .upstream_client import (
    UpstreamClient,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamRequestInvalid,
    UpstreamResponse,
    UpstreamUnreachable,
)

# The upstream's own request id and rate limits would contradict the gateway's.
_DROP_RESPONSE = (
    HOP_BY_HOP
    | OWN_HEADER_NAMES
    | {
        "content-encoding",
        "set-cookie",
        "x-request-id",
        "ratelimit",
        "ratelimit-policy",
        "date",
        "server",
    }
)
_DROP_RESPONSE_PREFIXES = ("x-ratelimit-", *OWN_HEADER_PREFIXES)
MAX_ERROR_BODY_BYTES = 1 << 20

log = logging.getLogger("ratelimit_gw.upstream")


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """One call to an upstream, and how to read its answer."""

    provider: str  # labels for the upstream metrics
    model: str
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    connect_timeout_s: float
    total_timeout_s: float
    parse_usage: Callable[[bytes], Usage | None]  # reads a whole answer's usage
    new_tap: Callable[[], StreamTap] | None  # for a streamed answer; None: read it whole
    # A converter route's: the answer (and the upstream's errors) rewritten in the caller's
    # protocol (docs/converters.md); None: relayed as the upstream sent it.
    translation: AnswerTranslation | None = None


@dataclass(frozen=True, slots=True)
class RefusedAnswer:
    """An upstream's error answer read whole and held back from the caller (failover)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def failed_before_answer(error: GatewayError) -> bool:
    """Did :meth:`Relay.open` raise ``error`` because the upstream timed out or could not be
    reached (not a refusal of the gateway's own)?"""
    return error.reason in ("upstream_timeout", "upstream_unreachable")


@dataclass(slots=True)
class RelayResult:
    """What the upstream produced; filled in as the relay goes, read by settlement."""

    outcome: str = "pending"  # ok | upstream_error | client_disconnect | upstream_cut
    status: int = 0
    ttfb_s: float | None = None  # until the upstream's response headers
    usage: Usage | None = None
    output_chars: int = 0


def upstream_request_headers(
    client_headers: Mapping[str, str],
    provider_headers: Mapping[str, str],
    policy: ClientHeaderPolicy,
) -> dict[str, str]:
    """The client's headers that ``policy`` forwards (it withholds every name the provider's
    headers set, in any letter case), then the provider's."""
    headers = policy.forwarded(client_headers)
    headers.update(provider_headers)
    return headers


def translated_request_headers(
    client_headers: Mapping[str, str],
    upstream: ProtocolAdapter,
    provider_headers: Mapping[str, str],
    policy: ClientHeaderPolicy,
) -> dict[str, str]:
    """A converter's upstream headers (docs/converters.md): the caller's that ``policy``
    forwards, less every protocol family's own (``anthropic-*``, ``openai-*``, ``x-goog-*``,
    the SDKs' ``x-stainless-*``: they describe a request the upstream does not get), plus what
    the upstream's protocol requires, then the provider's."""
    headers = {
        name: value
        for name, value in policy.forwarded(client_headers).items()
        if not name.lower().startswith(FAMILY_HEADER_PREFIXES)
    }
    for name, value in upstream.upstream_required_headers.items():
        if name.lower() not in policy.withheld:  # a provider's own header of that name wins
            headers[name] = value
    headers.update(provider_headers)
    return headers


def gateway_key_free(query: Iterable[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """The (percent-decoded) query parameters that carry no gateway key."""
    return ((name, value) for name, value in query if not carries_gateway_key(name, value))


def carries_gateway_key(name: str, value: str) -> bool:
    """Does a (percent-decoded) query parameter hold a gateway key? Such a parameter is never
    sent upstream, on any route: the caller's own key or another's, under any name (every
    gateway key starts with the prefix; an upstream's own key does not)."""
    return name.strip().startswith(KEY_PREFIX) or value.strip().startswith(KEY_PREFIX)


def shown_url(url: str) -> str:
    """An upstream URL fit for a log: no user info, no query (either may hold a credential)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    shown = f"[{host}]" if ":" in host else host
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a number: the request was never made, the host says enough
        port = ""
    return f"{parts.scheme}://{shown}{port}{parts.path}"


def client_response_headers(
    upstream: Iterable[tuple[str, str]], own: Mapping[str, str]
) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream:
        lower = name.lower()
        if lower in _DROP_RESPONSE or lower.startswith(_DROP_RESPONSE_PREFIXES):
            continue
        out.add(name, value)
    for name, value in own.items():
        out[name] = value
    return out


class _HeadersWithFirstWrite(web.StreamResponse):
    """A stream response whose headers wait for its first body write (one send, not two).

    aiohttp's own ``web.Response`` works this way; a ``StreamResponse`` sends its headers at
    ``prepare()`` unless this class attribute says otherwise. Should aiohttp drop the
    attribute, headers simply go out at ``prepare()`` again: one more write, nothing wrong.
    """

    _send_headers_immediately = False


class Relay:
    def __init__(self, client: UpstreamClient, metrics: Metrics) -> None:
        self._client = client
        self._metrics = metrics

    async def forward(
        self,
        request: web.Request,
        call: UpstreamCall,
        result: RelayResult,
        own_headers: Mapping[str, str],
    ) -> web.StreamResponse:
        """Call the upstream and relay its answer, whatever it is (one attempt, no failover)."""
        upstream = await self.open(call, result)
        return await self.deliver(request, call, upstream, result, own_headers)

    async def open(self, call: UpstreamCall, result: RelayResult) -> UpstreamResponse:
        """Send the call and wait for the upstream's status line and headers; nothing reaches
        the caller yet, so the answer may still be refused in favour of another attempt.

        Raises the 504/502 to answer for a time-out or a connection that failed
        (``result.outcome`` is then ``upstream_error``); :func:`failed_before_answer` tells
        them from the gateway's other errors.
        """
        result.outcome = "pending"
        result.status = 0
        started = time.perf_counter()
        # One deadline for the whole call, the streamed body included (timeout_s, docs/relay.md).
        deadline = asyncio.get_running_loop().time() + call.total_timeout_s
        try:
            upstream = await self._client.request(
                call.method,
                call.url,
                call.headers,
                call.body,
                connect_timeout_s=call.connect_timeout_s,
                deadline=deadline,
            )
        except TimeoutError:
            raise self._timed_out(call, result) from None
        except UpstreamError as exc:
            raise self._unreachable(call, result, exc) from None
        result.ttfb_s = time.perf_counter() - started
        result.status = upstream.status
        labelled(self._metrics.upstream_ttfb, call.provider, call.model).observe(result.ttfb_s)
        return upstream

    async def deliver(
        self,
        request: web.Request,
        call: UpstreamCall,
        upstream: UpstreamResponse,
        result: RelayResult,
        own_headers: Mapping[str, str],
    ) -> web.StreamResponse:
        """Relay an opened answer to the caller: streamed when the call has a tap and the
        answer is a 2xx stream, else read whole. Releases ``upstream``."""
        try:
            try:
                headers = client_response_headers(upstream.headers, own_headers)
                if upstream.status >= 400 or call.new_tap is None:
                    body = await upstream.read()
                    response: web.StreamResponse = self._buffered(
                        upstream.status, body, headers, result, call
                    )
                else:
                    if call.translation is not None:
                        headers["Content-Type"] = call.translation.stream_content_type
                    response = await self._streamed(
                        request, upstream, headers, result, call.new_tap()
                    )
            finally:
                upstream.release()
        except TimeoutError:
            raise self._timed_out(call, result) from None
        except UpstreamError as exc:
            raise self._unreachable(call, result, exc) from None
        self._count(
            call, "cut" if result.outcome == "upstream_cut" else f"{result.status // 100}xx"
        )
        return response

    async def refuse(self, call: UpstreamCall, upstream: UpstreamResponse) -> RefusedAnswer:
        """Read and release an opened error answer that the caller does not get now (another
        attempt follows); :meth:`deliver_refused` relays it should it be the last."""
        try:
            body = (await upstream.read())[:MAX_ERROR_BODY_BYTES]
        except (TimeoutError, UpstreamError):
            body = b""  # the status line says what the failover needs
        finally:
            upstream.release()
        self._count(call, f"{upstream.status // 100}xx")
        return RefusedAnswer(upstream.status, tuple(upstream.headers), body)

    def deliver_refused(
        self,
        call: UpstreamCall,
        refused: RefusedAnswer,
        result: RelayResult,
        own_headers: Mapping[str, str],
    ) -> web.Response:
        """Relay an error answer read by :meth:`refuse`: the last attempt's, when no key or
        fallback is left to try."""
        result.status = refused.status
        headers = client_response_headers(refused.headers, own_headers)
        return self._buffered(refused.status, refused.body, headers, result, call)

    def _timed_out(self, call: UpstreamCall, result: RelayResult) -> GatewayError:
        result.outcome = "upstream_error"
        self._count(call, "timeout")
        log.warning(
            "upstream %s at %s timed out (connect_timeout_s %g, timeout_s %g)",
            call.provider,
            shown_url(call.url),
            call.connect_timeout_s,
            call.total_timeout_s,
        )
        return GatewayError(
            504, "upstream_timeout", "The upstream did not answer in time.", retry_after_ms=1000
        )

    def _unreachable(
        self, call: UpstreamCall, result: RelayResult, exc: UpstreamError
    ) -> GatewayError:
        result.outcome = "upstream_error"
        self._count(call, "unreachable")
        if isinstance(exc, UpstreamUnreachable):
            message = "The upstream could not be reached."
        elif isinstance(exc, UpstreamRequestInvalid):
            message = f"The upstream request could not be made: {exc}."
        else:
            message = f"The upstream connection failed: {exc}."
        log.warning(
            "upstream %s at %s %s: %s",
            call.provider,
            shown_url(call.url),
            "unreachable" if isinstance(exc, UpstreamUnreachable) else "failed",
            exc,
        )
        return GatewayError(502, "upstream_unreachable", message)

    def _count(self, call: UpstreamCall, outcome: str) -> None:
        labelled(self._metrics.upstream_responses, call.provider, outcome).inc()

    def _buffered(
        self,
        status: int,
        body: bytes,
        headers: CIMultiDict[str],
        result: RelayResult,
        call: UpstreamCall,
    ) -> web.Response:
        translation = call.translation
        if status < 400:
            result.outcome = "ok"
            result.usage = call.parse_usage(body)  # the upstream's own figures, before translation
            if translation is not None:
                body = translation.answer(body)
                headers["Content-Type"] = translation.content_type
        else:
            # On a native route the provider's own error body is already in the caller's
            # protocol (docs/limits-and-balance.md); a converter's is rewritten into it.
            result.outcome = "upstream_error"
            body = body[:MAX_ERROR_BODY_BYTES]
            if translation is not None:
                body = translation.error(status, body)
                headers["Content-Type"] = translation.caller.error_content_type
        return web.Response(status=status, body=body, headers=headers)

    async def _streamed(
        self,
        request: web.Request,
        upstream: UpstreamResponse,
        headers: CIMultiDict[str],
        result: RelayResult,
        tap: StreamTap,
    ) -> web.StreamResponse:
        # Headers go out in one write with the first event when the upstream sent both at
        # once, and the last event with the stream's terminator; nothing is ever held back
        # waiting for upstream bytes that haven't arrived.
        eager = upstream.body_buffered
        response_class = _HeadersWithFirstWrite if eager else web.StreamResponse
        response = response_class(status=upstream.status, headers=headers)
        await response.prepare(request)
        result.outcome = "upstream_cut"
        last = b""
        try:
            async for chunk in upstream.iter_chunks():
                out = tap.feed(chunk)
                if upstream.finished:
                    last = out
                elif out:
                    await response.write(out)
            last += tap.flush()
            result.outcome = "ok"
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            result.outcome = "client_disconnect"
        except (TimeoutError, UpstreamConnectionError):
            result.outcome = "upstream_cut"  # the status line is sent: end the stream short
        finally:
            if result.outcome != "ok":
                # Cut short (upstream, client or shutdown): let the tap read what it still
                # holds; Gemini's JSON-array tap reads its whole stream only here.
                tap.flush()
            result.usage = tap.usage
            result.output_chars = tap.output_chars
        if result.outcome != "client_disconnect":
            try:
                await response.write_eof(last if result.outcome == "ok" else b"")
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                result.outcome = "client_disconnect"
        return response
