"""Outbound HTTP: one shared ClientSession per upstream, timeouts that suit
streams (connect, first byte, idle gap; never a total timeout), a circuit
breaker, and error mapping that never leaks the upstream credential."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import aiohttp
from aiohttp import ClientSession, ClientTimeout, TCPConnector

from .catalog import Upstream
from .errors import UpstreamError, kind_for_upstream_status
from .protocol import UpstreamRequest

MAX_ERROR_BODY = 64 * 1024


def scrub(text: str, secrets_: list[str]) -> str:
    for s in secrets_:
        if s and len(s) >= 4:
            text = text.replace(s, "[redacted]")
    return text


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class Breaker:
    """Consecutive-failure circuit breaker with growing cool-down (Envoy's
    outlier ejection): after ``threshold`` failures in a row the upstream is
    skipped for base * 2**(ejections-1) seconds (capped), then readmitted;
    one success resets it."""

    def __init__(self, threshold: int, base: float, cap: float) -> None:
        self.threshold, self.base, self.cap = threshold, base, cap
        self.failures = 0
        self.ejections = 0
        self.until = 0.0

    def available(self, now: float | None = None) -> bool:
        return (now or time.monotonic()) >= self.until

    def success(self) -> None:
        self.failures = 0
        self.ejections = 0
        self.until = 0.0

    def failure(self) -> bool:
        """Record a failure; True when this failure ejected the upstream."""
        self.failures += 1
        if self.failures >= self.threshold:
            self.ejections += 1
            self.failures = 0
            self.until = time.monotonic() + min(self.cap, self.base * 2 ** (self.ejections - 1))
            return True
        return False


class UpstreamClient:
    """Transport for one upstream."""

    def __init__(self, upstream: Upstream, breaker: Breaker) -> None:
        self.upstream = upstream
        self.breaker = breaker
        cfg = upstream.config
        self.session: ClientSession | None = None
        self._secrets = [s for s in (cfg.api_key,) if s]
        self.timeout = ClientTimeout(total=None, connect=cfg.connect_timeout, sock_connect=cfg.connect_timeout, sock_read=cfg.idle_timeout)

    async def open(self) -> None:
        cfg = self.upstream.config
        self.session = ClientSession(
            connector=TCPConnector(limit=cfg.max_connections, ttl_dns_cache=300, enable_cleanup_closed=True),
            timeout=self.timeout,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    @property
    def name(self) -> str:
        return self.upstream.config.name

    def url(self, path: str) -> str:
        return self.upstream.provider.url(path)

    async def send(self, ureq: UpstreamRequest) -> aiohttp.ClientResponse:
        """Send and wait for the response headers (bounded by first_byte_timeout).
        Raises UpstreamError for connection failures, timeouts and error statuses."""
        assert self.session is not None
        provider = self.upstream.provider
        headers = {"Content-Type": "application/json", **ureq.headers, **provider.auth_headers()}
        query = {**ureq.query, **provider.auth_query()} if (ureq.query or provider.auth_query()) else None
        cfg = self.upstream.config
        try:
            async with asyncio.timeout(cfg.first_byte_timeout):
                resp = await self.session.post(self.url(ureq.path), data=ureq.body, headers=headers, params=query)
        except TimeoutError:
            raise UpstreamError(
                "upstream_timeout", f"upstream {self.name!r} did not answer within {cfg.first_byte_timeout:g}s",
                upstream_status=None, retryable=True,
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            msg = scrub(f"{type(exc).__name__}: {exc}", self._secrets)
            raise UpstreamError("upstream_failed", f"upstream {self.name!r} could not be reached ({msg})", retryable=True) from None
        if resp.status >= 400:
            try:
                body = await resp.content.read(MAX_ERROR_BODY)
            except (aiohttp.ClientError, OSError, TimeoutError):
                body = b""
            finally:
                resp.release()
            raise self.error_for(resp.status, body, resp.headers.get("Retry-After"))
        return resp

    def error_for(self, status: int, body: bytes, retry_after: str | None) -> UpstreamError:
        proto = self.upstream.protocol
        try:
            detail = proto.decode_error(status, body) if proto else body[:300].decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - a malformed error body must not become a 500
            detail = ""
        detail = scrub(detail, self._secrets)[:500]
        if status in (401, 403) or (status == 400 and b"API_KEY_INVALID" in body):
            # the gateway's own credential was refused: never relay the body (it may echo the key)
            msg = f"upstream {self.name!r} refused the gateway's credentials (HTTP {status}); the operator must fix the upstream api_key"
            return UpstreamError("upstream_failed", msg, upstream_status=status, retryable=True)
        kind = kind_for_upstream_status(status)
        retryable = status in (408, 409, 425, 429) or status >= 500
        status_out = status if 400 <= status < 500 else None
        return UpstreamError(
            kind, f"upstream {self.name!r} returned HTTP {status}: {detail}" if detail else f"upstream {self.name!r} returned HTTP {status}",
            status=status_out, upstream_status=status, retry_after=parse_retry_after(retry_after), retryable=retryable,
        )

    async def read_first(self, resp: aiohttp.ClientResponse) -> bytes:
        """The first body chunk, bounded by first_byte_timeout (headers can come
        long before the first token)."""
        cfg = self.upstream.config
        try:
            async with asyncio.timeout(cfg.first_byte_timeout):
                return await resp.content.readany()
        except TimeoutError:
            raise UpstreamError(
                "upstream_timeout", f"upstream {self.name!r} sent no data within {cfg.first_byte_timeout:g}s", retryable=True
            ) from None


def backoff_delay(attempt: int, retry_after: float | None) -> float:
    """Jittered exponential back-off (base 25 ms, Envoy's default); an upstream's
    Retry-After wins when given."""
    if retry_after is not None:
        return retry_after
    return random.uniform(0, 0.025 * 2**attempt)


def read_error(exc: BaseException, name: str) -> UpstreamError:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return UpstreamError("upstream_timeout", f"upstream {name!r} stalled mid-stream (idle timeout)")
    return UpstreamError("upstream_failed", f"upstream {name!r} connection failed mid-stream ({type(exc).__name__})")


def is_read_error(exc: BaseException) -> bool:
    return isinstance(exc, (aiohttp.ClientError, OSError, TimeoutError, asyncio.TimeoutError))


__all__: list[Any] = ["UpstreamClient", "Breaker", "backoff_delay", "read_error", "is_read_error", "scrub"]
