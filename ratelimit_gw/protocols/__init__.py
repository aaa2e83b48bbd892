"""Per-protocol adapters: request views, usage taps and error envelopes (§3, §7, §8).

``ADAPTERS`` maps each client protocol to its stateless adapter; the gateway picks one
per route and never looks at protocol details itself.
"""

from __future__ import annotations

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

__all__ = [
    "ADAPTERS",
    "ProtocolAdapter",
    "RequestInfo",
    "Route",
    "StreamTap",
    "UnboundedInput",
    "UpstreamEdits",
    "Usage",
    "estimate_input_tokens",
    "input_token_bound",
]
