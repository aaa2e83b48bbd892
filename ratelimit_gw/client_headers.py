"""Which of a caller's request headers reach an upstream (docs/relay.md#request-headers).

Decided once per provider when the configuration loads (a :class:`ClientHeaderPolicy`), so a
request pays one set lookup per header it sends. Whatever the policy, some headers never
pass: hop-by-hop headers, every client credential, and any header the gateway sets itself
for that upstream (its credential above all: a client cannot override it in any letter case).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import msgspec

from .protocols import CREDENTIAL_HEADERS

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
    }
)
# Whatever a client sends to prove who it is must never reach the upstream.
CLIENT_CREDENTIALS = CREDENTIAL_HEADERS | {"cookie"}
# Compression is negotiated per hop: the gateway asks the upstream for none (the client decodes
# a compressed answer anyway) and sends the caller plain bytes.
NEVER_FORWARDED = HOP_BY_HOP | CLIENT_CREDENTIALS | {"accept-encoding"}
# They choose which upstream account or project a request is billed to, and the gateway owns
# the upstream account: dropped unless a provider's drop_headers or forward_headers say else.
DEFAULT_DROPPED = frozenset({"openai-organization", "openai-project"})


class ClientHeaderPolicy(msgspec.Struct, frozen=True):
    """``withheld``: lower-case names never forwarded. ``allowed``: when set, the only
    lower-case names forwarded (none of them withheld)."""

    withheld: frozenset[str]
    allowed: frozenset[str] | None = None

    def forwarded(self, client_headers: Mapping[str, str]) -> dict[str, str]:
        """The client's headers this upstream gets, in the client's order and letter case."""
        if self.allowed is not None:
            allowed = self.allowed
            return {k: v for k, v in client_headers.items() if k.lower() in allowed}
        withheld = self.withheld
        return {k: v for k, v in client_headers.items() if k.lower() not in withheld}


def client_header_policy(
    upstream_headers: Iterable[str],
    *,
    forward: Iterable[str] | None = None,
    drop: Iterable[str] = DEFAULT_DROPPED,
) -> ClientHeaderPolicy:
    """The policy for an upstream whose own headers are ``upstream_headers``: forward only
    ``forward`` (an allow list), else everything but ``drop`` (a deny list); either way never
    :data:`NEVER_FORWARDED` nor a header the gateway sets itself."""
    withheld = NEVER_FORWARDED | {name.lower() for name in upstream_headers}
    if forward is not None:
        return ClientHeaderPolicy(withheld, frozenset(n.lower() for n in forward) - withheld)
    return ClientHeaderPolicy(withheld | {name.lower() for name in drop})
