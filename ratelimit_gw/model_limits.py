"""Per-model rpm/tpm limits (SPEC §15, docs/limits-and-balance.md).

A key or an account may carry rpm/tpm per model id or glob (``*`` and ``?``, as Python's
``fnmatch.fnmatchcase``): ``{"gpt-4o*": {"rpm": 60, "tpm": 100000}}``. Each is kept in its
scope's hash as one field, ``model_limits``: this module's canonical JSON. admit.lua reads
both fields anyway (no extra call) and compares them, as the "model shape", with the shape
the gateway passes; the gateway matches the model against the patterns itself and passes
one bucket per matching pattern. A shape that differs is refused as ``model_limits_stale``
(writing nothing; the reply carries the real shape) and the gateway retries once, as it does
for budgets. So the matching is Python's, and the limits applied are the stored ones.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from typing import Annotated, Any

import msgspec

from .limits import MAX_LIMIT
from .management import AccountError, FieldChanges

MAX_PATTERNS = 20  # per scope
# Model ids and globs of `*`/`?`; no `[`, `]` (fnmatch classes), `|`, `#` or `=` (admit.lua's
# hold record), no spaces.
PATTERN = re.compile(r"^[A-Za-z0-9._:/@*?+\-]{1,128}$")
FIELD = "model_limits"
STALE = "model_limits_stale"


_Count = Annotated[int, msgspec.Meta(extra_json_schema={"minimum": 1, "maximum": MAX_LIMIT})]
_PATTERN_SCHEMA = {"minLength": 1, "maxLength": 128, "pattern": PATTERN.pattern}
Pattern = Annotated[str, msgspec.Meta(extra_json_schema=_PATTERN_SCHEMA)]


class ModelLimit(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """One pattern's limits: requests and/or tokens per minute (at least one)."""

    rpm: _Count | None = None
    tpm: _Count | None = None


# An admin body's ``model_limits``: pattern → limits (null or {} clears them all).
ModelLimitsBody = Annotated[
    dict[Pattern, ModelLimit], msgspec.Meta(extra_json_schema={"maxProperties": MAX_PATTERNS})
]


class ModelLimitsError(ValueError):
    pass


def checked(value: Any) -> dict[str, ModelLimit]:
    """``value`` (an admin body's ``model_limits``) as limits, or ModelLimitsError."""
    if not isinstance(value, dict):
        raise ModelLimitsError("model_limits must be an object of pattern → {rpm, tpm}")
    if len(value) > MAX_PATTERNS:
        raise ModelLimitsError(f"model_limits has more than {MAX_PATTERNS} patterns")
    out: dict[str, ModelLimit] = {}
    for pattern, limit in value.items():
        if not isinstance(pattern, str) or not PATTERN.match(pattern):
            raise ModelLimitsError(
                f"model_limits pattern {pattern!r}: 1-128 characters of letters, digits, "
                "._:/@+- and the globs * and ?"
            )
        if isinstance(limit, msgspec.Struct):
            limit = msgspec.structs.asdict(limit)
        if not isinstance(limit, dict) or not set(limit) <= {"rpm", "tpm"}:
            raise ModelLimitsError(f"model_limits[{pattern!r}] must be {{rpm, tpm}}")
        rpm, tpm = limit.get("rpm"), limit.get("tpm")
        for name, n in (("rpm", rpm), ("tpm", tpm)):
            if n is not None and (type(n) is not int or n < 1 or n > MAX_LIMIT):
                raise ModelLimitsError(f"model_limits[{pattern!r}].{name} must be a positive int")
        if rpm is None and tpm is None:
            raise ModelLimitsError(f"model_limits[{pattern!r}] needs rpm or tpm")
        out[pattern] = ModelLimit(rpm=rpm, tpm=tpm)
    return out


def encode(limits: dict[str, ModelLimit]) -> str:
    """The hash field's value: canonical (sorted) JSON."""
    return msgspec.json.encode({p: limits[p] for p in sorted(limits)}).decode()


def decode(field: str | None) -> dict[str, ModelLimit]:
    if not field:
        return {}
    return msgspec.json.decode(field, type=dict[str, ModelLimit])


def shape(account_field: str | None, key_field: str | None) -> str:
    """What admit.lua compares: "" when neither scope has per-model limits."""
    if not account_field and not key_field:
        return ""
    return f"{account_field or ''}\n{key_field or ''}"


@functools.lru_cache(maxsize=4096)
def matching(model_shape: str, model: str) -> tuple[tuple[str, str, int | None, int | None], ...]:
    """(scope, pattern, rpm, tpm) of every pattern of ``model_shape`` that matches ``model``:
    the account's first, then the key's."""
    account_field, _, key_field = model_shape.partition("\n")
    out = []
    for scope, field in (("account", account_field), ("key", key_field)):
        for pattern, limit in decode(field).items():
            if fnmatch.fnmatchcase(model, pattern):
                out.append((scope, pattern, limit.rpm, limit.tpm))
    return tuple(out)


def change(fields: FieldChanges, value: Any) -> None:
    """An update's ``model_limits`` (every pattern at once; None or {} clears them) as the
    scope hash's field write, or a 400."""
    if value is None or value == {}:
        fields.clear(FIELD)
        return
    try:
        fields.set(FIELD, encode(checked(value)))
    except ModelLimitsError as e:
        raise AccountError(400, "invalid_request", str(e)) from None
