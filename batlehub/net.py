"""Who is the client.

Forwarding headers (`X-Forwarded-For`, `X-Real-IP`, and for `batlehub.requests.base_url`
`X-Forwarded-Proto`, `X-Forwarded-Host`) are
believed only from a direct peer inside `[server] trusted_proxies`; from anyone else they are
ignored, so nobody escapes an IP block or frames another address by sending a header.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_warned_peers: set[str] = set()


@functools.lru_cache(maxsize=8192)
def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    # Cached: the same few peers (a load balancer, a CI runner) send nearly every request.
    text = text.strip().strip('"')
    if text.startswith("[") and "]" in text:  # "[::1]:1234"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "1.2.3.4:5678"
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def is_trusted(ip: str | None, trusted: Sequence[Network]) -> bool:
    if not ip or not trusted:
        return False
    return _is_trusted(ip, tuple(trusted))


@functools.lru_cache(maxsize=8192)
def _is_trusted(ip: str, trusted: tuple[Network, ...]) -> bool:
    parsed = _parse_ip(ip)
    return parsed is not None and any(parsed in net for net in trusted)


def canonical_ip(text: str) -> str | None:
    """An address the way blocks and logs name it (`::ffff:10.0.0.1` is `10.0.0.1`), or None."""
    parsed = _parse_ip(text)
    return str(parsed) if parsed else None


@functools.lru_cache(maxsize=8192)
def _canonical(peer: str) -> str:
    parsed = _parse_ip(peer)
    return str(parsed) if parsed else peer


def client_ip(peer: str | None, headers: Mapping[str, str], trusted: Sequence[Network]) -> str:
    """The client's address: walk `X-Forwarded-For` from the right past trusted hops when the
    direct peer is trusted; otherwise the direct peer itself.

    Several `X-Forwarded-For` lines are one list, in order (RFC 9110): a proxy that appends its
    own line instead of merging (HAProxy `option forwardfor`) leaves the client's forged line
    first, and reading only that line would let the client choose its address."""
    get = headers.get
    peer_text = _canonical(peer) if peer else "unknown"
    if not is_trusted(peer_text, trusted):
        if peer_text not in _warned_peers and (get("X-Forwarded-For") or get("X-Real-IP")):
            if len(_warned_peers) > 10_000:
                _warned_peers.clear()
            _warned_peers.add(peer_text)
            log.warning(
                "ignoring X-Forwarded-For/X-Real-IP from %s: not in server.trusted_proxies "
                "(add your load balancer's address there, or every client looks like it)",
                peer_text,
            )
        return peer_text
    getall = getattr(headers, "getall", None)
    lines = getall("X-Forwarded-For", ()) if getall is not None else [get("X-Forwarded-For") or ""]
    forwarded = ",".join(lines)
    if forwarded.strip(", "):
        hops = [h for h in (p.strip() for p in forwarded.split(",")) if h]
        for hop in reversed(hops):
            ip = _parse_ip(hop)
            if ip is None:
                break  # garbage in the chain: stop believing it here
            if not any(ip in net for net in trusted):
                return str(ip)
        else:
            if hops:
                ip = _parse_ip(hops[0])
                if ip is not None:
                    return str(ip)
    real_ip = get("X-Real-IP")
    if real_ip:
        ip = _parse_ip(real_ip)
        if ip is not None:
            return str(ip)
    return peer_text
