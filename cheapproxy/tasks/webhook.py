"""Webhook delivery for finished tasks, behind an SSRF guard.

A ``callback_url`` comes from a user, so the gateway must not become a way to
reach its own network (GHSA-xxv6-m6fx-vfhh, GHSA-9f46-w24h-69w4,
GHSA-v5c3-6wvc-pc2q, GHSA-6qcr-qxgr-m7fv):

* only ``http`` / ``https``, no embedded credentials;
* loopback, private, link-local, CGNAT, multicast, unspecified, reserved and
  other non-global addresses are refused, including IPv4-mapped, NAT64 and
  6to4 IPv6 forms of them, unless ``[tasks] webhook_allow_private``;
* a host name is checked by what it resolves to *at connect time*: the
  connector's resolver refuses bad addresses, so the address checked is the
  address connected to (no DNS-rebinding gap);
* redirects are never followed, and environment proxies are not used.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import re
import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_6TO4 = ipaddress.ip_network("2002::/16")
MAX_URL = 2048


class UnsafeURL(ValueError):
    """The callback URL is not allowed (the message says why)."""


class BlockedAddress(OSError):
    """Raised by the guarded resolver: the host resolves to a refused address."""


def address_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``ip`` may not be called back (None when it is a public address)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return address_problem(ip.ipv4_mapped)
        if any(ip in n for n in _NAT64):
            return address_problem(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)) or "a NAT64 address"
        if ip in _6TO4:
            return address_problem(ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)) or None
        if ip.teredo is not None:
            return "a Teredo address"
    checks = (
        ("is_unspecified", "an unspecified address"), ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"), ("is_multicast", "a multicast address"),
        ("is_reserved", "a reserved address"), ("is_private", "a private address"),
    )
    for attr, reason in checks:
        if getattr(ip, attr):
            return reason
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "a shared (CGNAT) address"
    if not ip.is_global:
        return "not a public address"
    return None


def _legacy_ipv4(host: str) -> bool:
    """``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``: forms inet_aton
    accepts (and resolvers turn into addresses) that are not dotted quads."""
    if not re.fullmatch(r"[0-9a-fA-FxX.]+", host) or not re.search(r"\d", host):
        return False
    try:
        ipaddress.IPv4Address(host)
        return False
    except ValueError:
        pass
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def check_url(url: Any, *, allow_private: bool = False) -> str:
    """Validate a callback URL's form and, when the host is an IP literal, its
    address; returns the URL.  Host names are checked again at connect time."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise UnsafeURL(f"must be an http(s) URL of at most {MAX_URL} characters")
    if any(c in url for c in "\r\n\t\0 ") or not url.isprintable():
        raise UnsafeURL("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UnsafeURL("is not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise UnsafeURL("must use http or https")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise UnsafeURL("must not contain credentials")
    host = parts.hostname
    if not host:
        raise UnsafeURL("has no host")
    if port == 0:
        raise UnsafeURL("has an invalid port")
    if _legacy_ipv4(host):
        raise UnsafeURL("uses a non-standard IPv4 address form")
    if allow_private:
        return url
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.rstrip(".").lower()
        if name == "localhost" or name.endswith(".localhost"):
            raise UnsafeURL("points at a loopback address") from None
        return url
    problem = address_problem(ip)
    if problem:
        raise UnsafeURL(f"points at {problem}")
    return url


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, then refuses the host when any
    address it resolves to is not public (a name that mixes public and private
    addresses is refused too)."""

    def __init__(self) -> None:
        self._inner = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for r in results:
            problem = address_problem(ipaddress.ip_address(r["host"]))
            if problem:
                raise BlockedAddress(f"callback host {host!r} resolves to {problem}")
        return results

    async def close(self) -> None:
        await self._inner.close()


async def resolve_problem(url: str) -> str | None:
    """Resolve the URL's host now; why it is refused, or None (also None when
    the name does not resolve at the moment: delivery checks it again)."""
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host)
        return None  # literals were checked by check_url
    except ValueError:
        pass
    try:
        async with asyncio.timeout(5):
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, TimeoutError):
        return None
    for info in infos:
        try:
            problem = address_problem(ipaddress.ip_address(info[4][0].split("%")[0]))
        except ValueError:
            continue
        if problem:
            return problem
    return None


class WebhookSender:
    """POSTs task objects to callback URLs: retries with doubling back-off,
    success is any 2xx.  One session, its resolver guarded unless private
    addresses are allowed."""

    def __init__(self, *, allow_private: bool, timeout_seconds: float, retries: int, backoff_seconds: float,
                 secret: str | None = None) -> None:
        self.allow_private = allow_private
        self.timeout_seconds = timeout_seconds
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.secret = secret
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=None if self.allow_private else GuardedResolver(),
                                             use_dns_cache=False, limit=64)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False,
                                                  timeout=aiohttp.ClientTimeout(total=self.timeout_seconds))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def headers(self, body: bytes, event: str) -> dict[str, str]:
        h = {"Content-Type": "application/json", "User-Agent": "cheapproxy-webhook", "X-Cheapproxy-Event": event}
        if self.secret:
            h["X-Cheapproxy-Signature"] = "sha256=" + hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        return h

    async def attempt(self, url: str, payload: dict[str, Any], event: str) -> tuple[bool, str]:
        """One delivery attempt: (delivered, what happened)."""
        try:
            check_url(url, allow_private=self.allow_private)
        except UnsafeURL as exc:
            return False, f"refused: callback_url {exc}"
        body = orjson.dumps(payload)
        try:
            async with self._open().post(url, data=body, headers=self.headers(body, event), allow_redirects=False) as r:
                await r.content.read(64 * 1024)
                return 200 <= r.status < 300, f"HTTP {r.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            blocked = getattr(exc, "os_error", None)
            if isinstance(blocked, BlockedAddress):
                return False, f"refused: {blocked}"
            return False, type(exc).__name__

    async def deliver(self, url: str, payload: dict[str, Any], event: str, *, attempts_done: int = 0) -> tuple[bool, int, str]:
        """Try until delivered or ``retries`` retries are used up; returns
        (delivered, attempts made in total, last outcome)."""
        outcome = ""
        n = attempts_done
        while n <= self.retries:
            if n:
                await asyncio.sleep(self.backoff_seconds * 2 ** max(n - 1, 0))
            ok, outcome = await self.attempt(url, payload, event)
            n += 1
            if ok:
                return True, n, outcome
            if outcome.startswith("refused"):
                break  # the address is not allowed: retrying cannot help
        return False, n, outcome
