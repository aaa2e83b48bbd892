"""Translation between the three chat protocols, for the converter routes (docs/converters.md).

One codec per protocol reads and writes :mod:`.ir`, the shape every translation passes
through; a converter is the caller's adapter and codec, the upstream's adapter and codec, and
:mod:`.relaying` to hand the translated answer to the relay.
"""

from __future__ import annotations

from ratelimit_gw.protocols.translation.anthropic_messages import AnthropicMessagesCodec
from ratelimit_gw.protocols.translation.gemini_generate import GeminiGenerateCodec
from ratelimit_gw.protocols.translation.ir import Codec
from ratelimit_gw.protocols.translation.openai_chat import OpenAIChatCodec

CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (OpenAIChatCodec(), AnthropicMessagesCodec(), GeminiGenerateCodec())
}

__all__ = ["CODECS", "Codec"]
