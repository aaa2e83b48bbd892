"""The limits of one account or key, as one value, and the flat form every wire gives them.

In code an account's or key's limits are one ``Limits``. On every wire they stay flat, as
they always were: the admin API's documents and bodies carry ``rpm``, ``tpm`` and
``concurrency`` beside ``id``; the CLI has ``--rpm``/``--tpm``/``--concurrency``; the
account's and key's storage hashes have one field each (admit.lua reads them by name); the
key index entry (decoded by every gateway on a key-cache miss, written by every build since)
is flat too. :func:`flat_type`, :func:`nest` and :func:`flatten` are the one place that
converts between the two, so a new limit type is one field here plus the Lua that enforces
it (and its flag's help in ``DESCRIPTIONS``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

import msgspec

S = TypeVar("S", bound=msgspec.Struct)


# The largest limit: the storage scripts count in Lua numbers (doubles), exact up to 2^53.
MAX_LIMIT = 2**53 - 1
# A limit is a count from 1 to MAX_LIMIT. Only documented here (the admin API's OpenAPI
# schemas): the account store refuses anything else with a message that names the limit.
_Count = Annotated[int, msgspec.Meta(extra_json_schema={"minimum": 1, "maximum": MAX_LIMIT})]


class Limits(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """None: no such limit. Frozen and untracked by the GC: a key's lives in the key cache."""

    rpm: _Count | None = None
    tpm: _Count | None = None
    concurrency: _Count | None = None

    def items(self) -> list[tuple[str, int | None]]:
        return list(zip(LIMIT_NAMES, msgspec.structs.astuple(self), strict=True))

    def hash_fields(self) -> list[Any]:
        """HSET name/value pairs of the limits that are set (an unset limit has no field)."""
        return [part for name, value in self.items() if value is not None for part in (name, value)]

    @classmethod
    def from_hash(cls, fields: Mapping[str, str]) -> Limits:
        """The limits a storage hash holds (an absent or empty field: no such limit)."""
        return cls(**{name: int(fields[name]) for name in LIMIT_NAMES if fields.get(name)})


LIMIT_NAMES: tuple[str, ...] = Limits.__struct_fields__
NO_LIMITS = Limits()
# What each limit counts, as the CLI's flags describe it.
DESCRIPTIONS = {
    "rpm": "requests per minute",
    "tpm": "tokens per minute",
    "concurrency": "requests in flight",
}
# The field a Struct holds its limits in; the flat form has the limits' fields in its place.
_FIELD = "limits"


def flat_type(nested: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """The wire form of ``nested``: a Struct with the same fields and options, its ``limits``
    field spelled out as the limits' own fields in its place (so a decoder of it names a bad
    field as ``$.rpm``, as the API always did)."""
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for field in msgspec.structs.fields(nested):
        spelled = msgspec.structs.fields(Limits) if field.name == _FIELD else (field,)
        for f in spelled:
            default = (
                f.default
                if f.default_factory is msgspec.NODEFAULT
                else msgspec.field(default_factory=f.default_factory)
            )
            fields.append((f.name, f.type) if f.required else (f.name, f.type, default))
    config = nested.__struct_config__
    return msgspec.defstruct(
        f"Flat{nested.__name__}",
        fields,
        kw_only=True,
        frozen=config.frozen,
        forbid_unknown_fields=config.forbid_unknown_fields,
        gc=False,
    )


def nest(flat: msgspec.Struct, nested: type[S]) -> S:
    """A value of :func:`flat_type` (``nested``) as the ``nested`` Struct it stands for."""
    values = msgspec.structs.asdict(flat)
    values[_FIELD] = Limits(**{name: values.pop(name) for name in LIMIT_NAMES})
    return nested(**values)


def flatten(document: Any) -> Any:
    """``document`` as builtins for a wire (JSON, the CLI's table), each ``limits`` object
    spelled out in its place: ``{"id": …, "rpm": 5, "tpm": null, "concurrency": null, …}``."""
    return _flatten(msgspec.to_builtins(document))


def _flatten(value: Any) -> Any:
    if isinstance(value, list):
        return [_flatten(item) for item in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for name, item in value.items():
        if name == _FIELD and isinstance(item, dict):
            out.update(item)
        else:
            out[name] = _flatten(item)
    return out
