"""Outbound HTTP: a lean HTTP/1.1 client (``cheapproxy.h1``) with a bounded
keep-alive pool per upstream for the POSTs of the request path, timeouts that
suit streams, a circuit breaker, a retry budget, and error mapping that never
leaks the upstream credential.  An aiohttp ``ClientSession`` per upstream
(``UpstreamClient.session``) stays open for task providers (GETs, downloads).

Timeouts (seconds, per upstream):

* ``connect_timeout``: DNS + TCP (+ TLS) connect.
* ``first_byte_timeout``: from sending the request to the first *body* chunk
  (response headers and first chunk share one budget: an upstream that sends
  headers and then thinks for a minute is the common stall).
* ``idle_timeout``: the longest gap between two body chunks, measured at each
  read.  There is no total timeout: a healthy stream may run for an hour.
"""

from __future__ import annotations

import asyncio
import random
import re
import ssl
import time
from typing import Any

from aiohttp import ClientSession, ClientTimeout, TCPConnector
from multidict import CIMultiDictProxy

from . import h1
from .catalog import Upstream
from .errors import ProxyError, UpstreamError, kind_for_upstream_status
from .protocol import UpstreamRequest

MAX_ERROR_BODY = 64 * 1024
MAX_RESPONSE_BYTES = 64 * 2**20  # a non-streamed answer larger than this is refused (502)
_DEFAULT_FIELDS = (("Content-Type", "application/json"),)


def scrub(text: str, secrets_: list[str]) -> str:
    for s in secrets_:
        if s and len(s) >= 4:
            text = text.replace(s, "[redacted]")
    return text


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds only; an HTTP date is
    ignored rather than trusted)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return None
    return min(max(0.0, seconds), 86400.0)


_UNSAFE_RE = re.compile("[\r\n\x00]")


def unsafe_text(value: str) -> bool:
    """True when ``value`` holds CR, LF or NUL (header / URL injection)."""
    return _UNSAFE_RE.search(value) is not None


def check_outbound(ureq: UpstreamRequest) -> None:
    """Refuse a request whose headers, path or query carry CR/LF/NUL: nothing a
    client sent may split an upstream header (GHSA-2vrm-gr82-f7m5 style)."""
    parts = [ureq.path, *ureq.headers.keys(), *ureq.headers.values()]
    if ureq.query:
        parts.extend(map(str, ureq.query.keys()))
        parts.extend(map(str, ureq.query.values()))
    if unsafe_text("".join(parts)):
        raise ProxyError("invalid_request", "A value that would reach an upstream header or URL contains CR, LF or NUL; "
                         "remove control characters from headers and names.")


class Breaker:
    """Consecutive-failure circuit breaker with growing cool-down (Envoy's
    outlier ejection): after ``threshold`` failures in a row the upstream is
    skipped for base * 2**(ejections-1) seconds (capped), then readmitted on
    probation: the first failure ejects it again (longer), one success closes
    the breaker and resets the back-off.  Failures reported while it is
    already cooling down (requests that were in flight) are not counted."""

    def __init__(self, threshold: int, base: float, cap: float) -> None:
        self.threshold, self.base, self.cap = max(1, threshold), base, cap
        self.failures = 0
        self.ejections = 0
        self.until = 0.0
        self.probation = False

    def available(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.until

    def success(self) -> None:
        self.failures = 0
        self.ejections = 0
        self.until = 0.0
        self.probation = False

    def failure(self) -> bool:
        """Record a failure; True when this failure ejected the upstream."""
        now = time.monotonic()
        if now < self.until:
            return False
        self.failures += 1
        if self.probation or self.failures >= self.threshold:
            self.ejections += 1
            self.failures = 0
            self.probation = True
            self.until = now + min(self.cap, self.base * 2 ** (self.ejections - 1))
            return True
        return False


class RetryBudget:
    """Finagle-style retry budget for one upstream: every request deposits
    ``percent``/100 of a retry, every retry withdraws one, on top of a reserve
    of ``minimum``.  Under a sustained failure the upstream sees at most about
    (1 + percent/100) times the request rate, never a retry storm."""

    def __init__(self, percent: float, minimum: int) -> None:
        self.ratio = max(0.0, percent) / 100.0
        self.cap = float(max(minimum, 1))
        self.tokens = float(minimum)
        self.refused = 0

    def deposit(self) -> None:
        self.tokens = min(self.cap, self.tokens + self.ratio)

    def withdraw(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.refused += 1
        return False


def counts_against(err: UpstreamError) -> bool:
    """Does this failure say the upstream is unhealthy (breaker)?  Connection
    errors, timeouts, 5xx and a refused gateway credential do; a 429, the
    upstream rejecting the request (4xx) and our own full pool do not."""
    if not err.kind.startswith("upstream_") or err.kind == "upstream_rejected":
        return False
    status = err.upstream_status
    return status is None or status >= 500 or status in (401, 403)


class UpstreamResponse:
    """An upstream answer that holds one pool slot until released.  Reads are
    bounded by the first-byte deadline, then by the idle timeout per chunk; a
    stall or a cut raises UpstreamError (``retryable`` only before the first
    chunk)."""

    __slots__ = ("client", "raw", "first_deadline", "started", "_slot")

    def __init__(self, client: UpstreamClient, raw: h1.H1Response, first_deadline: float) -> None:
        self.client = client
        self.raw = raw
        self.first_deadline = first_deadline
        self.started = False  # a body chunk arrived
        self._slot = True

    @property
    def status(self) -> int:
        return self.raw.status

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self.raw.headers

    async def read_chunk(self) -> bytes:
        """The next body chunk; b"" at the end of the body."""
        raw = self.raw
        try:
            chunk = raw.read_nowait()  # already buffered (or the end): no deadline needed
            if chunk is None:
                if not self.started:
                    chunk = await raw.read(self.first_deadline)
                else:
                    chunk = await raw.read(raw.conn.pool.loop.time() + self.client.upstream.config.idle_timeout)
        except TimeoutError:
            name, cfg = self.client.name, self.client.upstream.config
            if self.started:
                raise UpstreamError("upstream_timeout", f"upstream {name!r} stalled mid-stream: no data for "
                                    f"{cfg.idle_timeout:g}s (idle_timeout)") from None
            raise UpstreamError("upstream_timeout", f"upstream {name!r} sent no data within {cfg.first_byte_timeout:g}s "
                                "(first_byte_timeout)", retryable=True) from None
        except (h1.H1Error, OSError) as exc:
            name = self.client.name
            where = "mid-stream" if self.started else "before sending any data"
            raise UpstreamError("upstream_failed", f"upstream {name!r} connection failed {where} ({type(exc).__name__})",
                                retryable=not self.started) from None
        self.started = True
        return chunk

    async def read_all(self, limit: int = MAX_RESPONSE_BYTES) -> bytes:
        """The whole (non-streamed) body, bounded in size and by the same timeouts."""
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = await self.read_chunk()
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > limit:
                raise UpstreamError("upstream_failed", f"upstream {self.client.name!r} sent a response larger than "
                                    f"{limit} bytes")
            parts.append(chunk)

    def release(self) -> None:
        """Done with the response: an unfinished body closes the connection."""
        self.raw.release()
        self._give_back()

    def close(self) -> None:
        """Close the connection now (shutdown, disconnect)."""
        self.raw.close()
        self._give_back()

    def _give_back(self) -> None:
        if self._slot:
            self._slot = False
            self.client.free_slot()


class UpstreamClient:
    """Transport for one upstream."""

    def __init__(self, upstream: Upstream, breaker: Breaker, routing: Any = None) -> None:
        self.upstream = upstream
        self.breaker = breaker
        cfg = upstream.config
        self.session: ClientSession | None = None  # task providers' GETs and downloads (not send())
        self.pools: dict[str, h1.H1Pool] = {}  # send()'s keep-alive connections, per origin
        self.ssl_context: ssl.SSLContext | None = None  # None: ssl.create_default_context()
        self._secrets = [s for s in (cfg.api_key,) if s]
        self.pool_timeout = float(getattr(routing, "pool_timeout_seconds", 5.0))
        self.budget = RetryBudget(float(getattr(routing, "retry_budget_percent", 20.0)),
                                  int(getattr(routing, "retry_budget_min", 10)))
        self.slots = asyncio.Semaphore(cfg.max_connections)
        self.busy = 0  # pool slots in use (a leak shows here)
        # (the session, for task providers) connect bounds DNS + TCP (+ TLS).
        # sock_read is only a backstop: the real first byte and idle limits are
        # enforced at each read (a sock_read shorter than first_byte_timeout
        # would cut a legitimately slow first token).
        backstop = max(cfg.first_byte_timeout, cfg.idle_timeout) + 5.0
        self.timeout = ClientTimeout(total=None, connect=cfg.connect_timeout, sock_connect=cfg.connect_timeout,
                                     sock_read=backstop)

    async def open(self) -> None:
        cfg = self.upstream.config
        self.session = ClientSession(
            connector=TCPConnector(limit=cfg.max_connections, ttl_dns_cache=300, enable_cleanup_closed=True),
            timeout=self.timeout,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        pools, self.pools = list(self.pools.values()), {}
        for pool in pools:
            await pool.close()
        if self.session is not None:
            await self.session.close()

    @property
    def connections_in_use(self) -> int:
        """Upstream connections lent to a request right now (send()'s pools)."""
        return sum(p.in_use for p in self.pools.values())

    @property
    def connections_open(self) -> int:
        """Open upstream connections of send()'s pools, idle or in use."""
        return sum(len(p.conns) for p in self.pools.values())

    def _pool(self, origin: str) -> h1.H1Pool:
        pool = self.pools.get(origin)
        if pool is None:
            cfg = self.upstream.config
            try:
                pool = h1.H1Pool(origin, max_idle=cfg.max_connections, connect_timeout=cfg.connect_timeout,
                                 ssl_context=self.ssl_context)
            except (h1.H1Error, ValueError) as exc:
                msg = scrub(str(exc), self._secrets)
                raise UpstreamError("upstream_failed", f"upstream {self.name!r} has an unusable base_url ({msg})") from None
            self.pools[origin] = pool
        return pool

    @property
    def name(self) -> str:
        return self.upstream.config.name

    @property
    def connector(self) -> TCPConnector | None:
        return self.session.connector if self.session is not None else None  # type: ignore[return-value]

    def url(self, path: str) -> str:
        return self.upstream.provider.url(path)

    def free_slot(self) -> None:
        self.busy -= 1
        self.slots.release()

    async def _acquire(self, deadline: float | None) -> None:
        if not self.slots.locked():
            await self.slots.acquire()  # free slot: no suspension, no timer
            self.busy += 1
            return
        loop = asyncio.get_running_loop()
        wait = self.pool_timeout if deadline is None else min(self.pool_timeout, max(0.0, deadline - loop.time()))
        try:
            async with asyncio.timeout(wait):
                await self.slots.acquire()
        except TimeoutError:
            n = self.upstream.config.max_connections
            raise UpstreamError("overloaded", f"all {n} connections to upstream {self.name!r} are busy; retry shortly",
                                status=503, retry_after=1, retryable=True) from None
        self.busy += 1

    async def send(self, ureq: UpstreamRequest, *, deadline: float | None = None) -> UpstreamResponse:
        """Send and wait for the response headers.  ``deadline`` (loop time) is
        the request's overall budget; the first-byte budget never outlives it.
        Raises UpstreamError for a full pool, connection failures, timeouts and
        error statuses (the body of an error is read, bounded, and scrubbed)."""
        check_outbound(ureq)
        provider = self.upstream.provider
        auth_query = provider.auth_query()
        query = {**ureq.query, **auth_query} if (ureq.query or auth_query) else None
        origin, path = h1.split_url(provider.url(ureq.path))
        pool = self._pool(origin)
        body = ureq.body
        # never Accept-Encoding: identity bodies (h1 still inflates gzip/deflate if one comes anyway)
        head = pool.head("POST", h1.request_target(path, query),
                         (*_DEFAULT_FIELDS, *ureq.headers.items(), *provider.auth_headers().items()), len(body))
        cfg = self.upstream.config
        # the pool's loop once it has connected (asking asyncio costs a getpid() syscall)
        loop = pool.loop or asyncio.get_running_loop()
        await self._acquire(deadline)
        try:
            first_deadline = loop.time() + cfg.first_byte_timeout
            if deadline is not None:
                first_deadline = min(first_deadline, deadline)
            try:
                # a redirect is never followed: it would carry our credential headers
                # (x-api-key, x-goog-api-key) to wherever the Location points
                raw = await pool.request(head, body, first_deadline)
            except h1.ConnectTimeoutError:
                raise UpstreamError("upstream_timeout", f"upstream {self.name!r} could not be reached within "
                                    f"{cfg.connect_timeout:g}s (connect_timeout)", retryable=True) from None
            except TimeoutError:
                raise UpstreamError("upstream_timeout", f"upstream {self.name!r} did not answer within "
                                    f"{cfg.first_byte_timeout:g}s (first_byte_timeout)", retryable=True) from None
            except h1.InvalidResponseError as exc:
                msg = scrub(f"{type(exc).__name__}: {exc}", self._secrets)
                raise UpstreamError("upstream_failed", f"upstream {self.name!r} sent an invalid HTTP response ({msg})",
                                    retryable=True) from None
            except (h1.H1Error, OSError) as exc:
                msg = scrub(f"{type(exc).__name__}: {exc}", self._secrets)
                raise UpstreamError("upstream_failed", f"upstream {self.name!r} could not be reached ({msg})",
                                    retryable=True) from None
        except BaseException:
            self.free_slot()
            raise
        status = raw.status
        if status < 300:
            return UpstreamResponse(self, raw, first_deadline)
        if status < 400:
            raw.release()
            self.free_slot()
            raise UpstreamError("upstream_failed", f"upstream {self.name!r} answered with a redirect (HTTP {status}); "
                                "redirects are not followed, check its base_url", upstream_status=status, retryable=True)
        try:
            error_body = await _read_error_body(raw, cfg.idle_timeout)
        finally:
            raw.release()
            self.free_slot()
        raise self.error_for(status, error_body, raw.headers.get("Retry-After"))

    def error_for(self, status: int, body: bytes, retry_after: str | None) -> UpstreamError:
        proto = self.upstream.protocol
        try:
            detail = proto.decode_error(status, body) if proto else body[:300].decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - a malformed error body must not become a 500
            detail = ""
        detail = scrub(str(detail), self._secrets)[:500]
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


async def _read_error_body(raw: h1.H1Response, timeout: float) -> bytes:
    """An error answer's body, at most MAX_ERROR_BODY bytes; b"" when it
    cannot be read within ``timeout``."""
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while size < MAX_ERROR_BODY:
                chunk = await raw.read()
                if not chunk:
                    break
                parts.append(chunk)
                size += len(chunk)
    except (h1.H1Error, OSError, TimeoutError):
        return b""
    return b"".join(parts)[:MAX_ERROR_BODY]


def backoff_delay(attempt: int, retry_after: float | None) -> float:
    """Jittered exponential back-off (base 25 ms, Envoy's default, capped at
    250 ms); an upstream's Retry-After wins when given."""
    if retry_after is not None:
        return retry_after
    return random.uniform(0, min(0.25, 0.025 * 2**attempt))


__all__ = ["UpstreamClient", "UpstreamResponse", "Breaker", "RetryBudget", "backoff_delay", "scrub",
           "check_outbound", "counts_against", "parse_retry_after", "unsafe_text"]
