"""The PROXY protocol (HAProxy's spec, versions 1 and 2): the real client address that an L4 proxy
or load balancer puts in front of the connection's first bytes.

Only believed from ``trusted_proxies`` (fastws.http): a trusted peer must send one, anyone else
who sends one is refused.
"""

from __future__ import annotations

import ipaddress
import struct

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = struct.Struct("!12sBBH")  # signature, version+command, family+transport, length
V2_FAMILIES = {0x1: (4, ipaddress.IPv4Address), 0x2: (16, ipaddress.IPv6Address)}


class ProxyHeaderError(ValueError):
    """A malformed PROXY header (the connection is refused with 400 and this reason)."""


def looks_like_proxy_header(data: bytes) -> bool:
    """True if ``data`` starts like a PROXY header (v1 or v2), possibly cut short."""
    n = min(len(data), len(V2_SIGNATURE))
    return n > 0 and (data[:n] == V2_SIGNATURE[:n] or data[: min(n, 6)] == V1_PREFIX[: min(n, 6)])


def parse(data: bytes) -> tuple[int, str | None] | None:
    """Parse the PROXY header at the start of ``data``.

    Returns None if more bytes are needed, else (bytes used, the source address; None for a
    LOCAL/UNKNOWN connection, e.g. the proxy's own health check).  Raises ProxyHeaderError.
    """
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    if not data:
        return None
    raise ProxyHeaderError("expected a PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[int, str | None] | None:
    if not data.startswith(V1_PREFIX[: len(data)]):
        raise ProxyHeaderError("expected a PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX} bytes")
        return None
    fields = data[:end].decode("ascii", "replace").split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return end + 2, None
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"malformed PROXY v1 line {data[:end][:60]!r}")
    try:
        source = ipaddress.ip_address(fields[2])
        ipaddress.ip_address(fields[3])
        ports = [int(p) for p in fields[4:6]]
    except ValueError:
        raise ProxyHeaderError(f"malformed PROXY v1 addresses {data[:end][:60]!r}") from None
    if source.version != (4 if fields[1] == "TCP4" else 6) or not all(0 <= p <= 65535 for p in ports):
        raise ProxyHeaderError(f"malformed PROXY v1 addresses {data[:end][:60]!r}")
    return end + 2, str(source)


def _parse_v2(data: bytes) -> tuple[int, str | None] | None:
    if len(data) < V2_HEADER.size:
        if not V2_SIGNATURE.startswith(data[: len(V2_SIGNATURE)]):
            raise ProxyHeaderError("expected a PROXY protocol header")
        return None
    signature, version_command, family_transport, length = V2_HEADER.unpack_from(data)
    if signature != V2_SIGNATURE:
        raise ProxyHeaderError("expected a PROXY protocol header")
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"unsupported PROXY protocol version {version_command >> 4}")
    command = version_command & 0xF
    if command > 1:
        raise ProxyHeaderError(f"unknown PROXY v2 command {command}")
    total = V2_HEADER.size + length
    if len(data) < total:
        return None
    family = V2_FAMILIES.get(family_transport >> 4)
    if command == 0 or family is None:  # LOCAL (health checks), or AF_UNSPEC / AF_UNIX
        return total, None
    size, address = family
    if length < 2 * size + 4:
        raise ProxyHeaderError("PROXY v2 address block too short")
    return total, str(address(data[V2_HEADER.size:V2_HEADER.size + size]))
