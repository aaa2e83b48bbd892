"""Script calls to one Redis server over a single pipelined connection per process.

This is the hot path's storage round trip for ``redis://`` and ``unix://`` URLs. redis-py's
pipeline costs, per batch, a task, a pooled-connection checkout (a lock) and reply parsing
in Python; here a batch is one socket write, hiredis parses replies in C as they arrive,
and each reply goes to the oldest waiting call — Redis answers one connection's commands
in the order they were sent, so no pool, lock or task sits between a handler and Redis.

* Calls made in the same event-loop turn go out in one write (alone, a call goes out on the
  next turn, so idle latency does not change). Each script is still its own atomic step.
* A ``deferrable`` call (settlement: nobody waits for it) may wait up to ``DEFER_S`` for the
  next urgent call and leave in its write; under load that is almost always sooner, and a
  settlement then costs neither side a write, a wake-up or a read of its own. The queue is
  sent in the order calls were made, so a settlement still reaches Redis before any
  admission made after it (a freed concurrency slot is free for the next request).
* A call that gets no reply within the command timeout means the connection is stuck: it
  is closed and every call waiting on it fails with a timeout (the caller's storage-error
  path: breaker, 503, settlement retry). The next call connects again.
* NOSCRIPT (after SCRIPT FLUSH, a restart or a failover): the script is loaded and the call
  sent again, once, on the same connection — both queue behind what is already in flight.
* A caller that gave up before its batch was written is dropped from the batch; once
  written, a script runs whether or not anyone still waits for its answer. A call that fails
  without ever being written (no connection could be made, or the channel was closed first)
  fails with a :class:`NeverSent` error: it certainly did not run.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis
from redis._parsers import BaseParser  # redis-py's error-reply → exception mapping
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

# The longest a deferrable call waits for company (see the module docstring). Short beside a
# request's own duration, so balances, ledgers and slots lag the response by at most this.
DEFER_S = 0.002


class NeverSent(Exception):
    """Mixed into the error of a call that was never written to Redis."""


class NotConnectedError(RedisConnectionError, NeverSent):
    """No connection took the call: connecting failed, or the channel was closed first."""


class ConnectTimeoutError(RedisTimeoutError, NeverSent):
    """Connecting (or its handshake) outlasted the timeout; the calls waiting for it were
    never written."""


class FlushSchedule:
    """When a queue of script calls goes out (this channel's and script_batch.py's): on the
    next loop turn once an urgent call is queued, within ``DEFER_S`` while only deferrable
    ones are. ``flush`` takes the whole queue and must call :meth:`taken` first."""

    __slots__ = ("_flush", "_later", "_soon")

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush
        self._soon = False
        self._later: asyncio.TimerHandle | None = None

    def queued(self, loop: asyncio.AbstractEventLoop, deferrable: bool) -> None:
        """A call was queued: make sure a flush comes soon enough for it."""
        if self._soon:
            return
        if not deferrable:
            self._soon = True
            loop.call_soon(self._flush)
        elif self._later is None:
            self._later = loop.call_later(DEFER_S, self._flush)

    def taken(self) -> None:
        """The queue is being taken whole: no flush is pending any more (a deferred one
        that was waiting would find nothing)."""
        self._soon = False
        if self._later is not None:
            self._later.cancel()
            self._later = None


class _Call:
    __slots__ = ("command", "deadline", "future", "script", "sent_again")

    def __init__(self, script: str, command: tuple[Any, ...], future: asyncio.Future[Any]) -> None:
        self.script = script  # "" for a plain command (the connection's handshake)
        self.command = command
        self.future = future
        self.deadline = 0.0
        self.sent_again = False


class _Connection(asyncio.Protocol):
    """One socket: writes batches, matches replies to calls in order, watches deadlines."""

    def __init__(self, channel: ScriptChannel) -> None:
        self._channel = channel
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace")
        self._waiting: collections.deque[_Call] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.open = True

    def send(self, calls: list[_Call]) -> None:
        assert self._transport is not None
        self._transport.write(b"".join(hiredis.pack_command(c.command) for c in calls))
        self._waiting.extend(calls)
        if self._watchdog is None:
            self._arm_watchdog()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if not self._waiting:  # a reply nobody asked for: the stream is out of step
                self.abort(RedisConnectionError("unexpected reply from Redis"))
                return
            call = self._waiting.popleft()
            if isinstance(reply, hiredis.ReplyError):
                error = BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call]
                if isinstance(error, NoScriptError) and call.script and not call.sent_again:
                    self._send_again(call)
                elif not call.future.done():
                    call.future.set_exception(error)
            elif not call.future.done():  # done: the caller gave up; the script still ran
                call.future.set_result(reply)

    def _send_again(self, call: _Call) -> None:
        call.sent_again = True
        call.deadline = asyncio.get_running_loop().time() + self._channel.timeout_s
        load = self._channel.load_call(call.script, call.deadline)
        self.send([load, call])

    def _arm_watchdog(self) -> None:
        self._watchdog = asyncio.get_running_loop().call_at(
            self._waiting[0].deadline, self._check_deadline
        )

    def _check_deadline(self) -> None:
        self._watchdog = None
        if not self._waiting:
            return
        if self._waiting[0].deadline <= asyncio.get_running_loop().time():
            self.abort(RedisTimeoutError("no reply from Redis within the command timeout"))
        else:
            self._arm_watchdog()

    def abort(self, error: Exception) -> None:
        """Drop the socket; every call still waiting on it gets ``error``."""
        self.open = False
        if self._transport is not None:
            self._transport.abort()
        self._fail_waiting(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._fail_waiting(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def _fail_waiting(self, error: Exception) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        waiting, self._waiting = self._waiting, collections.deque()
        for call in waiting:
            if not call.future.done():
                call.future.set_exception(error)


class ScriptChannel:
    """``call(script, keys, args)`` → a future of the script's reply.

    ``address``: redis-py's ``parse_url`` output (host/port or path, db, username,
    password). ``sources``: script name → Lua source.
    """

    def __init__(
        self,
        address: dict[str, Any],
        sources: dict[str, str],
        timeout_s: float,
        connect_timeout_s: float,
    ) -> None:
        self.timeout_s = timeout_s
        self._address = address
        self._connect_timeout_s = min(connect_timeout_s, timeout_s)
        self._sources = sources
        self._shas = {  # what Redis names a script by (EVALSHA); not a security use
            name: hashlib.sha1(src.encode(), usedforsecurity=False).hexdigest()
            for name, src in sources.items()
        }
        self._queue: list[_Call] = []
        self._schedule = FlushSchedule(self._flush)
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._unconnected: list[_Call] = []  # written once a connection is ready

    def call(
        self, script: str, keys: Sequence[str], args: list[Any], *, deferrable: bool = False
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        command = ("EVALSHA", self._shas[script], len(keys), *keys, *args)
        self._queue.append(_Call(script, command, future))
        self._schedule.queued(loop, deferrable)
        return future

    def load_call(self, script: str, deadline: float) -> _Call:
        """A SCRIPT LOAD whose reply nobody reads: the EVALSHA sent after it tells."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_consume)
        call = _Call("", ("SCRIPT", "LOAD", self._sources[script]), future)
        call.deadline = deadline
        return call

    def _flush(self) -> None:
        self._schedule.taken()
        batch = [c for c in self._queue if not c.future.done()]
        self._queue = []
        if not batch:
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        for call in batch:
            call.deadline = deadline
        connection = self._connection
        if connection is not None and connection.open:
            connection.send(batch)
            return
        self._unconnected.extend(batch)
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        connection: _Connection | None = None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                connection = await self._open()
                handshake = self._handshake(connection)
                if handshake:
                    await asyncio.gather(*(c.future for c in handshake))
        except BaseException as exc:
            if connection is not None:
                connection.abort(RedisConnectionError("handshake failed"))
            waiting, self._unconnected = self._unconnected, []
            error: Exception
            if isinstance(exc, RedisError):  # e.g. AUTH refused
                error = exc
            elif isinstance(exc, TimeoutError):
                error = ConnectTimeoutError("connecting to Redis timed out")
            else:
                error = NotConnectedError(f"cannot connect to Redis: {exc!r}")
                error.__cause__ = exc  # the OSError says why (refused, unreachable…)
            for call in waiting:
                if not call.future.done():
                    call.future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._connecting = None
        self._connection = connection
        waiting, self._unconnected = self._unconnected, []
        waiting = [c for c in waiting if not c.future.done()]
        if waiting:
            connection.send(waiting)

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        address = self._address
        if "path" in address:
            _, protocol = await loop.create_unix_connection(
                lambda: _Connection(self), address["path"]
            )
        else:
            _, protocol = await loop.create_connection(
                lambda: _Connection(self),
                address.get("host", "localhost"),
                address.get("port", 6379),
            )
        return protocol

    def _handshake(self, connection: _Connection) -> list[_Call]:
        """AUTH and SELECT as the URL says, and every script loaded, in one write."""
        commands: list[tuple[Any, ...]] = []
        password, username = self._address.get("password"), self._address.get("username")
        if password is not None:
            commands.append(("AUTH", username, password) if username else ("AUTH", password))
        if int(self._address.get("db") or 0):
            commands.append(("SELECT", int(self._address["db"])))
        commands.extend(("SCRIPT", "LOAD", source) for source in self._sources.values())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        calls = [_Call("", command, loop.create_future()) for command in commands]
        for call in calls:
            call.deadline = deadline
        connection.send(calls)
        return calls

    async def aclose(self) -> None:
        self._schedule.taken()
        queued, self._queue = self._queue, []
        for call in queued:  # nothing will send them now
            if not call.future.done():
                call.future.set_exception(NotConnectedError("storage closed"))
        if self._connecting is not None:
            self._connecting.cancel()
        if self._connection is not None:
            self._connection.abort(RedisConnectionError("storage closed"))
            self._connection = None


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so an unread failure logs nothing
