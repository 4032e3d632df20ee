"""Per-key rate limits: ``rpm`` (requests per rolling minute) and ``tpm``
(tokens per rolling minute, fed by ``add_tokens`` after settlement).

Counts are kept in one-second buckets, at most 60 per key.  A refused request
is not counted.  ``tpm`` is checked against tokens already used: the request
that crosses the limit is served, the next ones wait.

Two stores (``[server] rate_limits``):

* ``RateLimiter``: in memory, for a process that is alone on its database.
  At most ``max_keys`` keys are tracked (least recently used dropped), so
  memory is bounded whatever the request rate.
* ``SharedRateLimiter``: the buckets live in the database, so every process
  serving it (``serve --workers N``, several instances on one PostgreSQL)
  counts against one window.  Checking and counting a request is one
  transaction that the backend serialises per key, so two processes can never
  both admit the last request of a window.  Only keys with a limit pay for it,
  and a refused key's repeats are answered from memory until its wait ends.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from typing import Any, Callable

import structlog

from .errors import ProxyError, StorageError
from .pricing import MAX_TOKENS
from .storage.base import KeyRecord

WINDOW = 60  # seconds
CLOCK_SLACK = 5  # seconds another host's clock may run ahead of this one's (SharedRateLimiter)

log = structlog.get_logger("cheapproxy.ratelimit")


class _Window:
    """Per-second buckets [second, requests, tokens] of the last minute."""

    __slots__ = ("buckets",)

    def __init__(self) -> None:
        self.buckets: deque[list[int]] = deque()

    def prune(self, sec: int) -> None:
        while self.buckets and self.buckets[0][0] <= sec - WINDOW:
            self.buckets.popleft()

    def bucket(self, sec: int) -> list[int]:
        if not self.buckets or self.buckets[-1][0] < sec:  # a clock step back reuses the last bucket
            self.buckets.append([sec, 0, 0])
        return self.buckets[-1]

    def total(self, field: int) -> int:
        return sum(b[field] for b in self.buckets)

    def wait(self, field: int, limit: int, now: float) -> float:
        """Seconds until the window's ``field`` total drops below ``limit``."""
        excess = self.total(field) - limit + 1
        for sec, *counts in self.buckets:
            excess -= counts[field - 1]
            if excess <= 0:
                return max(sec + WINDOW - now, 0.0)
        return float(WINDOW)


class RateLimiter:
    """In-memory per-key limiter.  ``check`` before any hold; ``add_tokens``
    after settlement."""

    def __init__(self, *, max_keys: int = 100_000, sweep_every: int = 10_000) -> None:
        self.max_keys = max_keys
        self.sweep_every = sweep_every
        self._keys: OrderedDict[str, _Window] = OrderedDict()
        self._ops = 0

    def _window(self, key_id: str, sec: int) -> _Window:
        self._ops += 1
        if self._ops >= self.sweep_every:  # amortised: drop windows that emptied
            self._ops = 0
            self.forget_idle(sec)
        w = self._keys.get(key_id)
        if w is None:
            w = self._keys[key_id] = _Window()
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key_id)
        return w

    def check(self, key: KeyRecord, now: float | None = None) -> None:
        """Count one request for ``key``; 429 with ``retry_after`` when its
        rpm or tpm is used up.  ``now`` is in seconds (default: the monotonic
        clock, immune to wall-clock steps)."""
        if not key.rpm and not key.tpm:
            return
        now = time.monotonic() if now is None else now
        sec = math.floor(now)
        w = self._window(key.id, sec)
        w.prune(sec)
        refusal = _refusal(w, key, now)
        if refusal is not None:
            raise refusal
        w.bucket(sec)[1] += 1

    async def admit(self, key: KeyRecord) -> None:
        """``check`` for the request path (the shared limiter's is a database
        transaction)."""
        self.check(key)

    def add_tokens(self, key_id: str, n: int, now: float | None = None) -> None:
        """Count ``n`` tokens used by ``key_id`` (clamped to 0..MAX_TOKENS)."""
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            return
        now = time.monotonic() if now is None else now
        sec = math.floor(now)
        w = self._window(key_id, sec)
        w.prune(sec)
        w.bucket(sec)[2] += min(n, MAX_TOKENS)

    def forget_idle(self, now: float | None = None) -> int:
        """Drop keys with nothing in their window; returns how many."""
        sec = math.floor(time.monotonic() if now is None else now)
        idle = []
        for key_id, w in self._keys.items():
            w.prune(sec)
            if not w.buckets:
                idle.append(key_id)
        for key_id in idle:
            del self._keys[key_id]
        return len(idle)

    def __len__(self) -> int:
        return len(self._keys)


def _refusal(w: _Window, key: KeyRecord, now: float) -> ProxyError | None:
    """The 429 for one more request of ``key`` with ``w`` counted so far, or None."""
    why = _why_refused(w, key, now)
    return None if why is None else _refuse(*why)


def _why_refused(w: _Window, key: KeyRecord, now: float) -> tuple[str, float] | None:
    """(which limit, seconds until there is room) when ``w`` has no room for
    one more request of ``key``."""
    if key.tpm and w.total(2) >= key.tpm:
        return f"{key.tpm} tokens per minute", w.wait(2, key.tpm, now)
    if key.rpm and w.total(1) >= key.rpm:
        return f"{key.rpm} requests per minute", w.wait(1, key.rpm, now)
    return None


def _refuse(what: str, wait: float) -> ProxyError:
    seconds = max(1, math.ceil(wait))
    return ProxyError("rate_limited", f"Rate limit reached for this API key ({what}). Retry in {seconds} seconds.",
                      retry_after=seconds, code="rate_limit_exceeded")


class SharedRateLimiter:
    """rpm and tpm counted in the database's ``rate_windows`` table (one row
    per key and second), shared by every process that serves it.  Seconds are
    wall-clock (processes on several hosts must agree on them; a host whose
    clock is off by a few seconds shifts its requests by as much in the
    window).  ``track`` runs a background coroutine (the token counts written
    after settlement).

    A flood from one key must not take the database from the others, so:

    * a refusal is remembered until the moment it named: other processes only
      ever add counts, so the window cannot empty sooner, and the repeats are
      answered from memory without a transaction;
    * one process runs at most one ``rate_take`` per key at a time (the others
      of that key wait in line here, not for a pool connection or the SQLite
      write lock), and none waits in that line longer than ``line_timeout``
      seconds (a database too slow for that answers 503, as any storage
      failure does)."""

    def __init__(self, storage: Any, track: Callable[[Any], Any], *, max_refusals: int = 100_000,
                 line_timeout: float = 10.0) -> None:
        self.storage = storage
        self.track = track
        self.max_refusals = max_refusals
        self.line_timeout = line_timeout
        # (key id, rpm, tpm) -> (until, what): a changed limit is a new entry
        self._refused: dict[tuple[str, int | None, int | None], tuple[float, str]] = {}
        self._lines: dict[str, list[Any]] = {}  # key id -> [asyncio.Lock, users]
        self.transactions = 0  # rate_take calls made (the tests read it)

    def _remembered(self, ident: tuple[str, int | None, int | None], now: float) -> ProxyError | None:
        hit = self._refused.get(ident)
        if hit is None:
            return None
        until, what = hit
        if now < until <= now + WINDOW + CLOCK_SLACK:  # (past that, this clock stepped back: ask the database)
            return _refuse(what, until - now)
        del self._refused[ident]
        return None

    def _remember(self, ident: tuple[str, int | None, int | None], now: float, what: str, wait: float) -> None:
        if len(self._refused) >= self.max_refusals:
            # bounded: drop what expired and, unless that freed a quarter, the
            # oldest half too (so the next trim is max_refusals / 4 refusals away)
            live = {k: v for k, v in self._refused.items() if v[0] > now}
            if len(live) > self.max_refusals * 3 // 4:
                live = dict(list(live.items())[len(live) // 2:])
            self._refused = live
        self._refused[ident] = (now + wait, what)

    async def admit(self, key: KeyRecord, now: float | None = None) -> None:
        if not key.rpm and not key.tpm:
            return
        ident = (key.id, key.rpm, key.tpm)
        err = self._remembered(ident, time.time() if now is None else now)
        if err is not None:
            raise err
        line = self._lines.get(key.id)
        if line is None:
            line = self._lines[key.id] = [asyncio.Lock(), 0]
        line[1] += 1
        try:
            try:
                async with asyncio.timeout(self.line_timeout):
                    await line[0].acquire()
            except TimeoutError:
                raise StorageError(f"rate limit check: waited {self.line_timeout:g}s in line for the database") from None
            try:
                t = time.time() if now is None else now
                err = self._remembered(ident, t)  # refused while this one waited in line
                if err is None:
                    err = await self._take(key, ident, t)
            finally:
                line[0].release()
        finally:
            line[1] -= 1
            if not line[1]:
                del self._lines[key.id]
        if err is not None:
            raise err

    async def _take(self, key: KeyRecord, ident: tuple[str, int | None, int | None], now: float) -> ProxyError | None:
        sec = math.floor(now)
        refusal: list[tuple[str, float]] = []

        def decide(rows: list[Any]) -> bool:
            # runs inside the backend's transaction, with the key's rows of the last minute
            w = _Window()
            w.buckets.extend([int(r[0]), int(r[1]), int(r[2])] for r in rows if int(r[0]) > sec - WINDOW)
            why = _why_refused(w, key, now)
            refusal[:] = [why] if why is not None else []  # (a transaction retried decides again)
            return why is None

        self.transactions += 1
        await self.storage.rate_take(key.id, sec, decide)
        if not refusal:
            return None
        what, wait = refusal[0]
        self._remember(ident, now, what, wait)
        return _refuse(what, wait)

    def add_tokens(self, key_id: str, n: int, now: float | None = None) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            return
        sec = math.floor(time.time() if now is None else now)
        self.track(self._add(key_id, sec, min(n, MAX_TOKENS)))

    async def _add(self, key_id: str, sec: int, n: int) -> None:
        try:
            await self.storage.rate_add_tokens(key_id, sec, n)
        except Exception:  # noqa: BLE001 - a lost count lets a few more tokens through; the charge itself is safe
            log.warning("ratelimit.count_failed", key_id=key_id, exc_info=True)

    async def prune(self, now: float | None = None) -> int:
        """Drop the rows that left every window (the sweeper calls this)."""
        return int(await self.storage.rate_prune(math.floor(time.time() if now is None else now) - WINDOW))
