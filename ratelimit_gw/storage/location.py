"""Where storage is and why a call to it failed, in words an operator can act on.

Every storage error and log line names the place (the URL without its credentials:
``redis://10.0.0.5:6379/0``, a sentinel's or cluster's node list) and the cause
(``connection refused``, ``timed out``, ``NOAUTH Authentication required.``). A storage URL
may carry a password: it never appears in either.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qsl, unquote

from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import connect_failure_reason

_MAX_CAUSE_CHARS = 120


def storage_location(url: str) -> str:
    """``url`` without user, password and query (``unix://`` keeps its ``db``)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "?"
    address, slash, path = rest.partition("/")
    if scheme == "unix":  # unix://[user:password@]/path/redis.sock[?db=N&password=…]
        path, _, query = path.partition("?")
        db = dict(parse_qsl(query)).get("db")
        return f"unix://{slash}{path}" + (f"?db={db}" if db else "")
    path = path.partition("?")[0]
    return f"{scheme}://{address.rpartition('@')[2]}{slash}{path}"


def url_secrets(url: str) -> tuple[str, ...]:
    """The credentials a storage URL carries, to scrub from any text shown."""
    rest = url.partition("://")[2]
    address = rest if rest.startswith("/") else rest.partition("/")[0]
    credentials = address.rpartition("@")[0]
    secrets = [unquote(credentials.partition(":")[2])] if credentials else []
    query = rest.partition("?")[2]
    secrets += [v for k, v in parse_qsl(query) if k.lower() == "password"]
    return tuple(s for s in secrets if s)


def failure_cause(exc: BaseException) -> str:
    """A failed storage call's cause, in a few words: a timeout or the operating system's
    reason (``connection refused``) anywhere in the exception's chain, else Redis's own error
    reply with its code (``NOAUTH``, ``WRONGPASS``, ``READONLY``…), else the driver's message."""
    for link in _chain(exc):
        if isinstance(link, TimeoutError | RedisTimeoutError):
            return "timed out"
        if isinstance(link, OSError) and not isinstance(link, RedisError):
            return connect_failure_reason(link)
    code = getattr(exc, "status_code", None)  # redis-py strips it from an error reply
    if isinstance(exc, RedisError) and code:
        text = str(exc) if str(exc).startswith(code) else f"{code} {exc}"
    else:
        text = str(exc) or type(exc).__name__
    if "Connection refused" in text:  # redis-py folds the OSError into its message
        return "connection refused"
    # redis-py appends a client's repr to some messages ("No master found for 'x' : <…>").
    text = text.splitlines()[0].partition(" : <")[0] if text else type(exc).__name__
    return text if len(text) <= _MAX_CAUSE_CHARS else text[: _MAX_CAUSE_CHARS - 1] + "…"


def scrubbed(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__
