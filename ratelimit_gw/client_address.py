"""The address a request came from, for the access log (docs/operations.md#access-log).

Behind a load balancer the connection's peer is the balancer; the caller's address is in
``X-Forwarded-For``, which every hop appends to and any caller can write. So the header is
believed only as far as trusted hands wrote it (``server.trusted_proxies``): starting from a
trusted peer, the entries are read right to left and the first one that is not a trusted
proxy is the caller. With no trusted proxies (the default) the header is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

IPAddress = IPv4Address | IPv6Address


def trusted_network(text: str) -> IPv4Network | IPv6Network:
    """``10.0.0.0/8``, ``127.0.0.1`` or ``::1`` as a network; ValueError says what is wrong."""
    return ip_network(text.strip(), strict=True)


class ClientAddresses:
    def __init__(self, trusted_proxies: Iterable[str] = ()) -> None:
        self._trusted = tuple(trusted_network(text) for text in trusted_proxies)

    def of(self, request: web.Request) -> str | None:
        """The caller's address: the peer's, or, from a trusted peer, X-Forwarded-For's
        right-most entry that is not a trusted proxy (every entry trusted: the left-most)."""
        peer = request.remote
        if not self._trusted or not peer:
            return peer
        hop = _parse(peer)
        if hop is None or not self._is_trusted(hop):
            return peer
        forwarded = request.headers.getall("X-Forwarded-For", ())
        for entry in reversed(",".join(forwarded).split(",")):
            address = _parse(entry)
            if address is None:  # not an address: nothing left of it can be believed
                break
            hop = address
            if not self._is_trusted(hop):
                break
        return str(hop)

    def _is_trusted(self, address: IPAddress) -> bool:
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack listener's view of an IPv4 peer
        return any(address in network for network in self._trusted)


def _parse(entry: str) -> IPAddress | None:
    """An X-Forwarded-For entry (``1.2.3.4``, ``2001:db8::1``, and the ``1.2.3.4:5678`` and
    ``[2001:db8::1]:5678`` forms some proxies write) as an address; None if it is none."""
    text = entry.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return ip_address(text)
    except ValueError:
        return None
