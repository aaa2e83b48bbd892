"""The address a request came from, for the access log (docs/operations.md#access-log).

Behind a load balancer the connection's peer is the balancer; the caller's address is in
``X-Forwarded-For``, which every hop appends to and any caller can write. So the header is
believed only as far as trusted hands wrote it (``server.trusted_proxies``): starting from a
trusted peer, the entries are read right to left and the first one that is not a trusted
proxy is the caller. With no trusted proxies (the default) the header is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

# The longest address text an entry can hold: "[" IPv6 with an embedded IPv4 "]:" port.
_MAX_ENTRY_CHARS = 53
# Addresses already judged: callers and proxies repeat, and parsing one costs several µs.
_REMEMBERED_ADDRESSES = 4096


def trusted_network(text: str) -> IPv4Network | IPv6Network:
    """``10.0.0.0/8``, ``127.0.0.1`` or ``::1`` as a network; ValueError says what is wrong."""
    return ip_network(text.strip(), strict=True)


class ClientAddresses:
    def __init__(self, trusted_proxies: Iterable[str] = ()) -> None:
        self._trusted = tuple(trusted_network(text) for text in trusted_proxies)
        self._judge = lru_cache(maxsize=_REMEMBERED_ADDRESSES)(self._judged)

    def of(self, request: web.Request) -> str | None:
        """The caller's address: the peer's, or, from a trusted peer, X-Forwarded-For's
        right-most entry that is not a trusted proxy (every entry trusted: the left-most)."""
        peer = request.remote
        if not self._trusted or not peer or not self._judge(peer)[1]:
            return peer
        hop = peer
        for raw in reversed(",".join(request.headers.getall("X-Forwarded-For", ())).split(",")):
            entry = raw.strip()
            if len(entry) > _MAX_ENTRY_CHARS:
                break  # no address is that long (and no long text is remembered)
            address, trusted = self._judge(entry)
            if address is None:  # not an address: nothing left of it can be believed
                break
            hop = address
            if not trusted:
                break
        return hop

    def _judged(self, entry: str) -> tuple[str | None, bool]:
        """An X-Forwarded-For entry (``1.2.3.4``, ``2001:db8::1``, and the ``1.2.3.4:5678``
        and ``[2001:db8::1]:5678`` forms some proxies write) → (the address, is it a trusted
        proxy); (None, False) if it is no address."""
        text = entry
        if text.startswith("["):
            text = text[1:].partition("]")[0]
        elif text.count(":") == 1:
            text = text.partition(":")[0]
        try:
            address = ip_address(text)
        except ValueError:
            return None, False
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack listener's view of an IPv4 peer
        return str(address), any(address in network for network in self._trusted)
