"""The client's address: the TCP peer's, unless that peer is a configured proxy.

`X-Forwarded-For` is a list any client can write. Only the entries appended by proxies we
trust mean anything, so it is read from the right: each trusted hop vouches for the address
before it, and the first address that is not a trusted proxy is the client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _trusted(address: str, proxies: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in proxies)


def client_address(peer: str, forwarded_for: Iterable[str], proxies: Sequence[Network]) -> str:
    if not _trusted(peer, proxies):
        return peer
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",") if hop.strip()]
    address = peer
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break  # garbage from before the trusted chain: the last good hop is the client
        address = hop
        if not _trusted(hop, proxies):
            break
    return address
