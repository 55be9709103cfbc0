"""Where the gateway may POST a webhook: the URL rules and the address policy (no internal targets).

A webhook URL is the client's choice, so without a policy it makes the gateway a proxy into its own
network (cloud metadata, loopback admin ports, private services). The rules:

- ``http`` or ``https``, a host, no credentials (``user:pass@`` would be forwarded as Basic auth).
- The host is resolved and *every* address it has must be public: loopback, private, link-local,
  multicast, unspecified, reserved, shared (CGNAT), documentation, site-local and every other range
  that is not globally reachable are refused, IPv4 and IPv6 alike. A host that is written as a number in any spelling a URL parser or ``inet_aton``
  accepts (``2130706433``, ``0x7f.1``, ``0177.0.0.1``) is read as the address it spells, and IPv6
  addresses that carry an IPv4 address (IPv4-mapped, NAT64, 6to4) are judged by that IPv4 address too.
- An operator's allowlist (``webhook_allow``: IP addresses, CIDR networks, host names) lets chosen
  internal receivers through.

The check runs when a job is submitted and again before every delivery attempt; the attempt then
connects to the address that was checked (:class:`Destination`), never resolving the name a second
time, so a DNS answer that changes in between cannot redirect it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[IPAddress]]

SCHEMES = {"http": 80, "https": 443}
"""Schemes a webhook may use, with their default ports."""

_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*", re.ASCII)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_NOT_GLOBAL = tuple(
    ipaddress.ip_network(network)
    for network in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "240.0.0.0/4",
        "::/127",
        "100::/63",
        "2001::/23",
        "2001:db8::/32",
        "3fff::/20",
        "5f00::/16",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
    )
)
"""Blocks the IANA special-purpose registries mark not globally reachable, whole (``192.0.0.0/24`` with
its two anycast addresses), and IPv6 site-local ``fec0::/10`` (deprecated): checked beside ``ipaddress``'s
``is_global``, which some Python versions get wrong for a few of them (3.11.7 calls ``192.0.0.8`` and
``fec0::1`` global)."""


class WebhookRefused(ValueError):
    """A webhook URL the gateway will not call; the message is safe to return to the client."""


@dataclass(frozen=True)
class WebhookTarget:
    """A webhook URL taken apart: what the request is sent to, before any name is resolved."""

    scheme: str
    host: str  # lower case, without brackets or a trailing dot
    port: int
    path: str  # path and query, at least "/"
    address: IPAddress | None  # the address a numeric host spells; None for a name

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == SCHEMES[self.scheme] else f"{host}:{self.port}"


@dataclass(frozen=True)
class Destination:
    """A checked target: requests go to its checked ``addresses`` (in resolver order), with the URL's
    host in ``Host`` and in TLS SNI."""

    target: WebhookTarget
    addresses: tuple[IPAddress, ...]

    def url(self, address: IPAddress) -> str:
        host = f"[{address}]" if address.version == 6 else str(address)
        return f"{self.target.scheme}://{host}:{self.target.port}{self.target.path}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Host": self.target.host_header}

    @property
    def extensions(self) -> dict[str, str]:
        """For https to a name: the certificate is checked against the name, not the address."""
        if self.target.scheme == "https" and self.target.address is None:
            return {"sni_hostname": self.target.host}
        return {}


def parse_target(url: str) -> WebhookTarget:
    """Split ``url`` and apply the rules that need no lookup (scheme, credentials, host syntax)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise WebhookRefused("webhook_url is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise WebhookRefused("webhook_url must be an http or https URL")
    if "@" in parts.netloc:
        raise WebhookRefused("webhook_url must not contain credentials (user:password@)")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise WebhookRefused("webhook_url has no host")
    if not host.isascii():
        raise WebhookRefused("webhook_url host must be ASCII (IDNA names in punycode)")
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    return WebhookTarget(scheme, host, SCHEMES[scheme] if port is None else port, path, numeric_host(host))


def numeric_host(host: str) -> IPAddress | None:
    """The address ``host`` spells, if it is numeric; None for a name.

    IPv6 hosts come without brackets. An IPv4 host is read as the WHATWG URL standard (and
    ``inet_aton``) read it: one to four dot-separated numbers, each decimal, ``0x`` hex or
    ``0``-prefixed octal, the last one filling the remaining bytes. A host whose last label is a
    number but that is not such an address is refused rather than handed to a resolver.
    """
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise WebhookRefused("webhook_url host is not a valid IPv6 address") from None
    labels = host.split(".")
    if not (labels[-1].isdigit() or _ipv4_number(labels[-1]) is not None):
        return None
    numbers = [number for number in map(_ipv4_number, labels) if number is not None]
    if len(labels) > 4 or len(numbers) < len(labels) or any(n > 255 for n in numbers[:-1]):
        raise WebhookRefused("webhook_url host is not a valid IPv4 address")
    *head, last = numbers
    if last >= 256 ** (5 - len(numbers)):
        raise WebhookRefused("webhook_url host is not a valid IPv4 address")
    value = last
    for index, number in enumerate(head):
        value += number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def _ipv4_number(label: str) -> int | None:
    text, base = label, 10
    if text[:2].lower() == "0x":
        text, base = text[2:], 16
    elif len(text) > 1 and text.startswith("0"):
        text, base = text[1:], 8
    if not text:
        return 0 if base == 16 else None
    try:  # isalnum: int() would also take signs, spaces and underscores
        return int(text, base) if text.isalnum() and text.isascii() else None
    except ValueError:
        return None


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries and reaches: IPv4-mapped, NAT64, 6to4."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if any(address in network for network in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def forbidden_kind(address: IPAddress) -> str | None:
    """Why ``address`` is not a public one (e.g. ``"a loopback address"``), or None if it is."""
    if address.version == 6:
        inner = embedded_ipv4(address)
        if inner is not None and (kind := forbidden_kind(inner)) is not None:
            return f"{kind} ({inner}) inside an IPv6 address"
        if any(address in network for network in _NAT64):  # DNS64 answers: the IPv4 address decides
            return None
    checks = (
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_private", "a private address"),
        ("is_reserved", "a reserved address"),
    )
    for attribute, kind in checks:
        if getattr(address, attribute):
            return kind
    if address.version == 6 and address.scope_id:
        return "a scoped address"
    if not address.is_global or any(address.version == net.version and address in net for net in _NOT_GLOBAL):
        return "a non-public address"
    return None


def system_resolver(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (A and AAAA), through the system resolver."""
    try:
        answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise WebhookRefused(f"webhook_url host {host} does not resolve") from None
    return list(dict.fromkeys(ipaddress.ip_address(answer[4][0]) for answer in answers))


class AddressPolicy:
    """Decides which webhook targets may be called: public addresses, plus an operator's allowlist."""

    def __init__(self, allow: Iterable[str] = (), resolver: Resolver = system_resolver) -> None:
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.hosts: set[str] = set()
        for given in allow:
            entry = given.strip().lower().rstrip(".")
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if not _HOST_NAME.fullmatch(entry):
                    raise ValueError(
                        f"webhook_allow entry {entry!r} is neither an address, a network nor a host name"
                    ) from None
                self.hosts.add(entry)
        self.resolver = resolver

    def destination(self, url: str) -> Destination:
        """Check ``url`` and resolve its host; the address to connect to. Raises :class:`WebhookRefused`."""
        target = parse_target(url)
        if target.address is not None:
            addresses = [target.address]
        else:
            addresses = self.resolver(target.host, target.port)
            if not addresses:
                raise WebhookRefused(f"webhook_url host {target.host} does not resolve")
        addresses = [_unmapped(address) for address in addresses]
        if target.host not in self.hosts:
            for address in addresses:
                kind = self._refusal(address)
                if kind is not None:
                    via = "" if target.address is not None else f"{target.host} resolves to "
                    raise WebhookRefused(f"webhook_url: {via}{address}, {kind}, is not allowed")
        return Destination(target, tuple(dict.fromkeys(addresses)))

    def _refusal(self, address: IPAddress) -> str | None:
        if any(address.version == network.version and address in network for network in self.networks):
            return None
        return forbidden_kind(address)


def _unmapped(address: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (``::ffff:a.b.c.d``) as the IPv4 address it is: connect and match it as one."""
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
