"""Per-protocol adapters: request views, usage taps, error envelopes, headers, upstream URLs
and credentials (README.md Routes, docs/limits-and-balance.md, docs/relay.md). Nothing outside this
package knows a protocol's details.

``ADAPTERS`` maps each protocol to its stateless adapter. A route picks the caller's adapter
from the path it was called on (:func:`caller_protocol`) and the upstream's from the model's
provider; they are one adapter today, two (with a translator) on a converter route.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

from ratelimit_gw.protocols.anthropic import AnthropicAdapter
from ratelimit_gw.protocols.base import (
    ProtocolAdapter,
    RequestInfo,
    Route,
    StreamTap,
    UnboundedInput,
    UpstreamEdits,
    Usage,
    estimate_input_tokens,
    input_token_bound,
)
from ratelimit_gw.protocols.gemini import GeminiAdapter
from ratelimit_gw.protocols.openai import OpenAIAdapter

ADAPTERS: dict[str, ProtocolAdapter] = {
    adapter.name: adapter for adapter in (OpenAIAdapter(), AnthropicAdapter(), GeminiAdapter())
}
# The protocol names a provider may speak (config validation reads this type). Spelled out
# for the type checker; kept equal to ADAPTERS' keys here.
ProtocolName = Literal["openai", "anthropic", "gemini"]
assert set(get_args(ProtocolName)) == set(ADAPTERS), "ProtocolName must list every adapter"
# Every header that carries a credential, in any protocol or for an HTTP proxy.
CREDENTIAL_HEADERS = frozenset({"proxy-authorization"}).union(
    *(adapter.credential_headers for adapter in ADAPTERS.values())
)

# Every response header some protocol's adapter sets itself (add_own_headers).
OWN_HEADER_NAMES = frozenset[str]().union(*(a.own_header_names for a in ADAPTERS.values()))
# Every protocol family's request header prefixes (never forwarded across protocols).
FAMILY_HEADER_PREFIXES = tuple(
    sorted({p for a in ADAPTERS.values() for p in a.family_header_prefixes})
)
OWN_HEADER_PREFIXES = tuple(p for a in ADAPTERS.values() for p in a.own_header_prefixes)


def caller_protocol(path: str, headers: Mapping[str, str], query: Mapping[str, str]) -> str:
    """The protocol a caller speaks, from the route it called (and, for /v1/models, its key)."""
    for adapter in ADAPTERS.values():
        if adapter.is_called_on(path, headers, query):
            return adapter.name
    return "openai"


def credential_protocol(headers: Mapping[str, str], query: Mapping[str, str]) -> str:
    """The protocol of a caller on a route every SDK shares (``GET /v1/key``), from the
    credential form its SDK sends: ``x-goog-api-key`` or ``?key=`` → Gemini, ``x-api-key`` →
    Anthropic, else OpenAI (Bearer). ``headers`` must be case-insensitive."""
    if "x-goog-api-key" in headers or "key" in query:
        return "gemini"
    if "x-api-key" in headers:
        return "anthropic"
    return "openai"


__all__ = [
    "ADAPTERS",
    "CREDENTIAL_HEADERS",
    "FAMILY_HEADER_PREFIXES",
    "OWN_HEADER_NAMES",
    "OWN_HEADER_PREFIXES",
    "ProtocolAdapter",
    "ProtocolName",
    "RequestInfo",
    "Route",
    "StreamTap",
    "UnboundedInput",
    "UpstreamEdits",
    "Usage",
    "caller_protocol",
    "credential_protocol",
    "estimate_input_tokens",
    "input_token_bound",
]
