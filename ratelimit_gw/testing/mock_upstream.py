"""A fake LLM provider speaking the OpenAI, Anthropic and Gemini wire formats.

Used by the demo, the tests and the benchmark (where it is the baseline, so per-request work
is kept small). Answers are deterministic: the reply is ``chunks`` pieces of
``tokens_per_chunk`` words ("tok0 tok1 ..."), one word per token, cut short by the request's
output-token cap; input tokens are ``max(1, ceil(prompt_chars / 4))``. Usage numbers in every
body and stream are exact, so a gateway's metering can be checked against them.

Chat Completions, Messages and generateContent requests that declare tools are answered with
tool calls instead (``x-mock-tool-calls: N`` of them, default 1), unless their tool choice is
"none" or their latest input is a tool result: :mod:`ratelimit_gw.testing.mock_tools` says
which, and each call costs ``ceil(len(arguments JSON) / 4)`` output tokens.

Per-request behaviour can be changed with ``x-mock-*`` headers (see :class:`_Controls`), and
every request received is kept in a bounded log readable over HTTP (``/mock/requests``,
``/mock/stats``) or in-process through ``app[MOCK_STATE]``.

Per-credential behaviour (:mod:`ratelimit_gw.testing.mock_keys`) answers every request of one
upstream API key alike, on every route including the model lists: a status instead of the
reply (429 with a retry hint, 401, 503, ...) and latency before the headers. The credential is
the request's ``Authorization: Bearer`` (OpenAI), ``x-api-key`` (Anthropic), or
``x-goog-api-key`` / ``?key=`` (Gemini). Set and clear it in-process
(``MockState.set_key_behaviour`` / ``clear_key_behaviour``) or over HTTP::

    PUT    /mock/keys/{credential}   {"status": 429, "retry_after_s": 2}   -> the behaviour
    DELETE /mock/keys/{credential}                                        -> 204 (healed)
    GET    /mock/keys                {"k-429": {"status": 429, ...}, ...}

A key's behaviour applies before the ``x-mock-*`` headers are read (its latency adds to
theirs). ``/mock/stats`` answers ``{"requests": N, "by_key": {credential: N, ...}}``, also
``MockState.requests_by_key``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from . import mock_tools
from . import mock_wire as wire
from .mock_keys import KeyBehaviour, KeyBook, credential_of, key_routes
from .mock_tools import ToolRequest
from .mock_wire import Protocol, Reply, StreamFrames, ToolCall

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_JSON = "application/json"


@dataclass(frozen=True, slots=True)
class MockSettings:
    latency_ms: float = 0  # before the response headers, i.e. time to first byte
    chunk_delay_ms: float = 0  # between consecutive text chunks of a stream
    chunks: int = 4
    tokens_per_chunk: int = 5
    models: tuple[str, ...] = ("gpt-4o-mini", "claude-sonnet-4-6", "gemini-2.5-flash")
    request_log_size: int = 1000
    record_requests: bool = True  # the benchmark may turn the log off to measure pure serving

    def __post_init__(self) -> None:
        if self.latency_ms < 0 or self.chunk_delay_ms < 0:
            raise ValueError("latency_ms and chunk_delay_ms must be >= 0")
        if self.chunks < 0 or self.tokens_per_chunk < 1 or self.request_log_size < 0:
            raise ValueError("need chunks >= 0, tokens_per_chunk >= 1, request_log_size >= 0")


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    query_string: str
    headers: dict[str, str]  # keys lower-cased; a repeated header keeps its last value
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query_string": self.query_string,
            "headers": self.headers,
            "body": self.body.decode("utf-8", errors="replace"),
        }


@dataclass(frozen=True, slots=True)
class _Controls:
    """Settings for one request: the defaults, overridden by ``x-mock-*`` headers."""

    latency_s: float
    chunk_delay_s: float
    chunks: int
    error_status: int | None  # x-mock-error: answer this status instead
    retry_after_s: int | None  # x-mock-retry-after: sent as retry-after on injected errors
    error_after_chunks: int | None  # x-mock-error-after-chunks: reset the stream after N
    ignore_cap: bool  # x-mock-ignore-cap: behave like an upstream that ignores max_tokens
    malformed_sse: bool  # x-mock-malformed-sse: garbage frames between a stream's own frames
    # x-mock-cache-read-tokens / x-mock-cache-write-tokens: this many of the input tokens are
    # reported as read from / written to a prompt cache (writes: Anthropic only)
    cache_read_tokens: int
    cache_write_tokens: int
    # x-mock-tool-calls: how many calls a request with tools is answered with (>= 1), unless
    # it disables parallel calls
    tool_calls: int


class _MockError(Exception):
    """An error answered in the route's own protocol error shape, with the retry hint's
    headers and (a Gemini 429's RetryInfo) delay."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: Mapping[str, str] | None = None,
        retry_delay_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        self.retry_delay_ms = retry_delay_ms


def _int_header(headers: Mapping[str, str], name: str, minimum: int) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise _MockError(400, f"{name} must be an integer") from None
    if value < minimum:
        raise _MockError(400, f"{name} must be >= {minimum}")
    return value


def _flag_header(headers: Mapping[str, str], name: str) -> bool:
    return headers.get(name, "").strip().lower() in ("1", "true", "yes")


def _ms_header(headers: Mapping[str, str], name: str, default_s: float) -> float:
    raw = headers.get(name)
    if raw is None:
        return default_s
    try:
        value_ms = float(raw)
    except ValueError:
        raise _MockError(400, f"{name} must be a number of milliseconds") from None
    if not value_ms >= 0:  # also rejects NaN
        raise _MockError(400, f"{name} must be >= 0")
    return value_ms / 1000


class MockState:
    """Per-app state: settings, the request log, per-credential behaviour and pre-encoded
    static bodies."""

    def __init__(self, settings: MockSettings) -> None:
        self.settings = settings
        self.total_requests = 0
        self.keys = KeyBook()
        self._log: deque[RecordedRequest] = deque(maxlen=settings.request_log_size)
        self._seq = itertools.count(1)
        self.openai_models = wire.openai_models(settings.models)
        self.anthropic_models = wire.anthropic_models(settings.models)
        self.gemini_models = wire.gemini_models(settings.models)

    @property
    def requests(self) -> list[RecordedRequest]:
        """The most recent requests, oldest first (at most ``request_log_size``)."""
        return list(self._log)

    def clear(self) -> None:
        """Empty the log; ``total_requests`` and ``requests_by_key`` keep counting since
        start-up."""
        self._log.clear()

    def set_key_behaviour(self, credential: str, behaviour: KeyBehaviour) -> None:
        """Answer every request of ``credential`` as ``behaviour`` says, from now on."""
        self.keys.set(credential, behaviour)

    def clear_key_behaviour(self, credential: str) -> None:
        """Answer ``credential`` normally again (heal it)."""
        self.keys.clear(credential)

    @property
    def requests_by_key(self) -> dict[str, int]:
        """Requests per upstream credential since start-up, model lists included."""
        return self.keys.requests

    def record(self, request: web.Request, body: bytes) -> None:
        self.total_requests += 1
        if self.settings.record_requests:
            headers = {k.lower(): v for k, v in request.headers.items()}
            self._log.append(
                RecordedRequest(request.method, request.path, request.query_string, headers, body)
            )

    def controls(self, headers: Mapping[str, str]) -> _Controls:
        s = self.settings
        ignore_cap = _flag_header(headers, "x-mock-ignore-cap")
        chunks = _int_header(headers, "x-mock-chunks", 0)
        return _Controls(
            latency_s=_ms_header(headers, "x-mock-latency-ms", s.latency_ms / 1000),
            chunk_delay_s=_ms_header(headers, "x-mock-chunk-delay-ms", s.chunk_delay_ms / 1000),
            chunks=s.chunks if chunks is None else chunks,
            error_status=_int_header(headers, "x-mock-error", 400),
            retry_after_s=_int_header(headers, "x-mock-retry-after", 0),
            error_after_chunks=_int_header(headers, "x-mock-error-after-chunks", 0),
            ignore_cap=ignore_cap,
            malformed_sse=_flag_header(headers, "x-mock-malformed-sse"),
            cache_read_tokens=_int_header(headers, "x-mock-cache-read-tokens", 0) or 0,
            cache_write_tokens=_int_header(headers, "x-mock-cache-write-tokens", 0) or 0,
            tool_calls=_int_header(headers, "x-mock-tool-calls", 1) or 1,
        )

    def reply(
        self,
        body: dict[str, Any],
        ctl: _Controls,
        model: str,
        cap: int | None,
        tool_calls: tuple[ToolCall, ...] = (),
    ) -> Reply:
        return wire.plan_reply(
            seq=next(self._seq),
            model=model,
            created_s=int(time.time()),
            input_tokens=wire.count_input_tokens(body),
            chunks=ctl.chunks,
            tokens_per_chunk=self.settings.tokens_per_chunk,
            cap_tokens=cap,
            ignore_cap=ctl.ignore_cap,
            cache_read_tokens=ctl.cache_read_tokens,
            cache_write_tokens=ctl.cache_write_tokens,
            tool_calls=tool_calls,
        )


MOCK_STATE = web.AppKey("mock_state", MockState)


@dataclass(slots=True)
class _Call:
    request: web.Request
    state: MockState
    ctl: _Controls
    body: dict[str, Any] = field(default_factory=dict)

    def reply(self, model: str, cap: int | None, tools: ToolRequest = mock_tools.NO_TOOLS) -> Reply:
        try:
            calls = mock_tools.plan_calls(tools, self.ctl.tool_calls)
        except mock_tools.UnknownTool as err:
            raise _MockError(400, str(err)) from None
        return self.state.reply(self.body, self.ctl, model, cap, calls)

    def model(self) -> str:
        model = self.body.get("model")
        return model if isinstance(model, str) else "mock-model"


def _cap(body: Mapping[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_Route = Callable[[_Call], Awaitable[web.StreamResponse]]


def _endpoint(protocol: Protocol | None) -> Callable[[_Route], _Handler]:
    """Wrap a route with what every upstream route shares: log, overrides, latency, errors.

    ``protocol`` picks the error shape; ``None`` means the route is shared by several
    protocols and the caller's headers decide.
    """

    def wrap(route: _Route) -> _Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            state = request.app[MOCK_STATE]
            raw = await request.read()
            state.record(request, raw)
            route_protocol = protocol or _detect_protocol(request)
            key = state.keys.on_request(
                credential_of(route_protocol, request.headers, request.query)
            )
            try:
                if key is not None:
                    await _apply_key_behaviour(key)
                ctl = state.controls(request.headers)
                if ctl.latency_s > 0:
                    await asyncio.sleep(ctl.latency_s)
                if ctl.error_status is not None:
                    hint = ctl.retry_after_s
                    raise _MockError(
                        ctl.error_status,
                        f"mock upstream: injected {ctl.error_status} error",
                        None if hint is None else {"retry-after": str(hint)},
                    )
                call = _Call(request, state, ctl)
                if raw:
                    try:
                        body = msgspec.json.decode(raw)
                    except msgspec.DecodeError:
                        raise _MockError(400, "request body is not valid JSON") from None
                    if not isinstance(body, dict):
                        raise _MockError(400, "request body must be a JSON object")
                    call.body = body
                return await route(call)
            except _MockError as err:
                return web.Response(
                    status=err.status,
                    body=wire.error_body(
                        route_protocol, err.status, err.message, err.retry_delay_ms
                    ),
                    content_type=_JSON,
                    headers=err.headers,
                )

        return handler

    return wrap


async def _apply_key_behaviour(key: KeyBehaviour) -> None:
    if key.latency_ms > 0:
        await asyncio.sleep(key.latency_ms / 1000)
    if key.status is not None:
        # The message names no key: a gateway may relay it, and a test may check that no
        # upstream credential reaches a caller.
        raise _MockError(
            key.status,
            f"mock upstream: this key answers {key.status}",
            key.hint_headers(),
            key.retry_delay_ms,
        )


def _json(body: bytes) -> web.Response:
    return web.Response(body=body, content_type=_JSON)


def _reset(request: web.Request) -> None:
    # close() (not abort()) so the frames already written still reach the client, which then
    # sees the body end without its terminating chunk: a mid-stream connection reset.
    if request.transport is not None:
        request.transport.close()


async def _stream(
    call: _Call, frames: StreamFrames, headers: Mapping[str, str] = _SSE_HEADERS
) -> web.StreamResponse:
    resp = web.StreamResponse(headers=headers)
    await resp.prepare(call.request)
    # The client may hang up mid-stream (a gateway does when its own caller leaves): what a
    # real provider sees every day, not an error of the mock's, so no traceback.
    with contextlib.suppress(ConnectionResetError):
        await _write_frames(call, resp, frames)
    return resp


async def _write_frames(call: _Call, resp: web.StreamResponse, frames: StreamFrames) -> None:
    ctl = call.ctl
    # Malformed: after the head and after every piece, frames no parser should choke on.
    garbage = wire.MALFORMED_SSE_FRAMES if ctl.malformed_sse else b""
    if frames.head or garbage:
        await resp.write(frames.head + garbage)
    for i, frame in enumerate(frames.chunks):
        if i == ctl.error_after_chunks:
            _reset(call.request)
            return
        if i and ctl.chunk_delay_s > 0:
            await asyncio.sleep(ctl.chunk_delay_s)
        await resp.write(frame + garbage)
    if ctl.error_after_chunks is not None:
        _reset(call.request)  # N >= number of chunks: still never finish the stream
        return
    await resp.write(frames.tail)
    await resp.write_eof()


@_endpoint("openai")
async def _chat_completions(call: _Call) -> web.StreamResponse:
    cap = _cap(call.body, "max_completion_tokens", "max_tokens")
    reply = call.reply(call.model(), cap, mock_tools.openai_request(call.body))
    if call.body.get("stream") is not True:
        return _json(wire.chat_completion(reply))
    options = call.body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return await _stream(call, wire.chat_stream(reply, include_usage))


@_endpoint("openai")
async def _responses(call: _Call) -> web.StreamResponse:
    reply = call.reply(call.model(), _cap(call.body, "max_output_tokens"))
    if call.body.get("stream") is not True:
        return _json(wire.response(reply))
    return await _stream(call, wire.response_stream(reply))


@_endpoint("anthropic")
async def _messages(call: _Call) -> web.StreamResponse:
    reply = call.reply(
        call.model(), _cap(call.body, "max_tokens"), mock_tools.anthropic_request(call.body)
    )
    if call.body.get("stream") is not True:
        return _json(wire.anthropic_message(reply))
    return await _stream(call, wire.anthropic_stream(reply))


def _detect_protocol(request: web.Request) -> Protocol:
    # GET /v1/models is shared by all three SDKs (google-genai defaults to /v1 too); each one
    # marks its requests with its own auth or version header.
    headers = request.headers
    if "anthropic-version" in headers:
        return "anthropic"
    if "x-goog-api-key" in headers or "key" in request.query:
        return "gemini"
    return "openai"


@_endpoint(None)
async def _models(call: _Call) -> web.StreamResponse:
    protocol = _detect_protocol(call.request)
    if protocol == "anthropic":
        return _json(call.state.anthropic_models)
    if protocol == "gemini":
        return _json(call.state.gemini_models)
    return _json(call.state.openai_models)


@_endpoint("gemini")
async def _gemini_generate(call: _Call) -> web.StreamResponse:
    # aiohttp cannot put a literal ':' between two placeholders, so the route captures
    # "{model}:{action}" as one segment and splits on the last ':'.
    model, _, action = call.request.match_info["model_action"].rpartition(":")
    if action not in ("generateContent", "streamGenerateContent") or not model:
        raise _MockError(404, f"unknown method {action!r}")
    config = call.body.get("generationConfig", call.body.get("generation_config"))
    cap = _cap(config, "maxOutputTokens", "max_output_tokens") if isinstance(config, dict) else None
    if cap == 0:
        cap = None  # protobuf cannot tell 0 from unset: Gemini answers with its maximum
    reply = call.reply(model, cap, mock_tools.gemini_request(call.body))
    if action == "generateContent":
        return _json(wire.gemini_response(reply))
    if call.request.query.get("alt") == "sse":
        return await _stream(call, wire.gemini_sse_stream(reply))
    return await _stream(call, wire.gemini_array_stream(reply), {"Content-Type": _JSON})


async def _get_requests(request: web.Request) -> web.Response:
    logged = [r.to_dict() for r in request.app[MOCK_STATE].requests]
    return _json(msgspec.json.encode(logged))


async def _delete_requests(request: web.Request) -> web.Response:
    request.app[MOCK_STATE].clear()
    return web.Response(status=204)


async def _get_stats(request: web.Request) -> web.Response:
    state = request.app[MOCK_STATE]
    return _json(
        msgspec.json.encode({"requests": state.total_requests, "by_key": state.requests_by_key})
    )


def create_mock_app(settings: MockSettings | None = None) -> web.Application:
    app = web.Application()
    state = app[MOCK_STATE] = MockState(settings or MockSettings())
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/responses", _responses)
    app.router.add_post("/v1/messages", _messages)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1beta/models", _models)
    for prefix in ("/v1beta/models/", "/v1/models/"):
        app.router.add_post(prefix + "{model_action}", _gemini_generate)
    app.router.add_get("/mock/requests", _get_requests)
    app.router.add_delete("/mock/requests", _delete_requests)
    app.router.add_get("/mock/stats", _get_stats)
    app.router.add_routes(key_routes(state.keys))
    return app


async def start_mock_upstream(
    host: str = "127.0.0.1", port: int = 0, settings: MockSettings | None = None
) -> tuple[web.AppRunner, str]:
    """Serve the mock in the running loop; port 0 picks a free port. Call ``runner.cleanup()``."""
    # A short shutdown timeout: a test tearing down mid-stream should not wait a minute.
    runner = web.AppRunner(create_mock_app(settings), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    return runner, f"http://{shown_host}:{bound_port}"


def run_mock_upstream(
    host: str = "127.0.0.1", port: int = 8001, settings: MockSettings | None = None
) -> None:
    """Serve the mock until interrupted (the ``ratelimit-gw mock-upstream`` subcommand)."""
    web.run_app(create_mock_app(settings), host=host, port=port, access_log=None)
