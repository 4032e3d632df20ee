"""Per-key rate limits: rolling-minute rpm and tpm, Retry-After, bounded memory; and the
shared limiter, whose counts live in the database for every process on it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
from typing import Any, AsyncIterator

import pytest

from cheapproxy.config import ServerConfig
from cheapproxy.errors import ProxyError, StorageError
from cheapproxy.ratelimit import RateLimiter, SharedRateLimiter
from cheapproxy.storage.base import KeyRecord
from cheapproxy.storage.sqlite import SQLiteStorage


def key(kid: str = "key_a", **kw) -> KeyRecord:
    return KeyRecord(id=kid, user_id=1, key_hash=hashlib.sha256(kid.encode()).hexdigest(), **kw)


def refused(rl: RateLimiter, k: KeyRecord, now: float) -> ProxyError:
    with pytest.raises(ProxyError) as exc:
        rl.check(k, now=now)
    return exc.value


def test_rpm_rolling_minute_with_retry_after() -> None:
    rl, k = RateLimiter(), key(rpm=3)
    for t in (100.0, 100.1, 130.5):
        rl.check(k, now=t)
    err = refused(rl, k, 131.0)
    assert (err.kind, err.status, err.retry_after) == ("rate_limited", 429, 29)  # second 100 leaves the window at 160
    assert err.message == "Rate limit reached for this API key (3 requests per minute). Retry in 29 seconds."
    assert k.key_hash not in err.message
    assert refused(rl, k, 159.9).retry_after == 1  # refused calls are not counted
    rl.check(k, now=160.0)  # the two calls of second 100 expired: room for two
    rl.check(k, now=160.2)
    assert refused(rl, k, 160.3).retry_after == 30  # 130.5 leaves at 190


def test_tpm_counts_settled_tokens() -> None:
    rl, k = RateLimiter(), key(tpm=1000)
    rl.check(k, now=10)
    rl.add_tokens(k.id, 600, now=10)
    rl.check(k, now=20)
    rl.add_tokens(k.id, 500, now=20)  # the call that crosses the limit was already served
    err = refused(rl, k, 30)
    assert (err.status, err.retry_after) == (429, 40)
    assert "1000 tokens per minute" in err.message
    rl.check(k, now=70)  # the 600 expired, 500 < 1000


def test_limits_are_per_key_and_off_by_default() -> None:
    rl = RateLimiter()
    a, b, free = key("a", rpm=1), key("b", rpm=1), key("free")
    rl.check(a, now=0)
    rl.check(b, now=0)
    refused(rl, a, 1)
    for i in range(10_000):
        rl.check(free, now=i / 100)
    assert len(rl) == 2  # unlimited keys are not tracked at all


def test_add_tokens_ignores_nonsense_and_saturates() -> None:
    rl, k = RateLimiter(), key(tpm=10**9)
    for n in (-5, True, 2.5, "7", 0):
        rl.add_tokens(k.id, n, now=0)  # type: ignore[arg-type]
    rl.check(k, now=1)
    rl.add_tokens(k.id, 10**30, now=1)  # clamped to 1e9: exactly the limit
    assert refused(rl, k, 2).retry_after == 59


def test_memory_is_bounded() -> None:
    rl = RateLimiter(max_keys=100, sweep_every=1000)
    for i in range(1000):
        rl.check(key(f"k{i}", rpm=10), now=0)
    assert len(rl) == 100
    busy = key("busy", rpm=10**9, tpm=10**12)
    for i in range(100_000):  # ~10 requests/s for 10,000 simulated seconds
        rl.check(busy, now=i / 10)
        rl.add_tokens(busy.id, 10, now=i / 10)
    assert len(rl._keys["busy"].buckets) <= 60
    assert len(rl) == 1  # the 100 idle keys were swept on the way (amortised, every 1000 operations)
    assert rl.forget_idle(now=100_000) == 1
    assert len(rl) == 0


def test_clock_step_back_does_not_corrupt_the_window() -> None:
    rl, k = RateLimiter(), key(rpm=2)
    rl.check(k, now=100)
    rl.check(k, now=90)  # wall clock went back: counted in the newest bucket
    err = refused(rl, k, 100.5)
    assert err.retry_after == 60


# ---------------------------------------------------------------- shared by processes


@contextlib.asynccontextmanager
async def _shared_pair(tmp_path: Any) -> AsyncIterator[tuple[list[Any], list[SharedRateLimiter], list[Any]]]:
    """Two storages on one SQLite file (what two worker processes open), each
    with its own shared limiter; the background token writes are collected."""
    stores = [SQLiteStorage("sqlite:///limits.db", tmp_path) for _ in range(2)]
    for s in stores:
        await s.open()
    tasks: list[Any] = []

    def track(coro: Any) -> Any:
        t = asyncio.get_running_loop().create_task(coro)
        tasks.append(t)
        return t

    try:
        yield stores, [SharedRateLimiter(s, track) for s in stores], tasks
    finally:
        for s in stores:
            await s.close()


async def test_shared_rpm_is_one_window_for_every_process(tmp_path: Any) -> None:
    async with _shared_pair(tmp_path) as (stores, (a, b), _):
        k = key(rpm=3)
        await a.admit(k, now=1000.0)
        await b.admit(k, now=1000.1)
        await a.admit(k, now=1030.5)
        with pytest.raises(ProxyError) as exc:
            await b.admit(k, now=1031.0)  # the fourth in a minute, on the other process
        err = exc.value
        assert (err.kind, err.status, err.retry_after) == ("rate_limited", 429, 29)
        assert err.message == "Rate limit reached for this API key (3 requests per minute). Retry in 29 seconds."
        with pytest.raises(ProxyError):
            await a.admit(k, now=1059.9)  # refused calls are not counted ...
        await b.admit(k, now=1060.0)  # ... so second 1000's two leave the window at 1060: room for two
        await a.admit(k, now=1060.2)
        with pytest.raises(ProxyError) as exc:
            await b.admit(k, now=1060.3)
        assert exc.value.retry_after == 30  # 1030.5 leaves at 1090
        rows = await stores[0]._in_thread_tx(lambda c: c.execute(
            "SELECT second, requests FROM rate_windows WHERE key_id = ? ORDER BY second", (k.id,)).fetchall(), fold=False)
        assert [tuple(r) for r in rows] == [(1000, 2), (1030, 1), (1060, 2)]  # old seconds wait for the sweeper
        await a.admit(key("unlimited"), now=1060.4)  # keys without a limit are never written
        assert await stores[1].rate_prune(1000) == 1
        assert await stores[1].rate_prune(2000) == 2


async def test_shared_tpm_counts_tokens_settled_on_any_process(tmp_path: Any) -> None:
    async with _shared_pair(tmp_path) as (stores, (a, b), tasks):
        k = key(tpm=1000)
        await a.admit(k, now=10.0)
        a.add_tokens(k.id, 600, now=10.0)
        await b.admit(k, now=20.0)
        b.add_tokens(k.id, 500, now=20.0)  # the call that crosses the limit was already served
        for n in (-5, True, 2.5, "7", 0):
            b.add_tokens(k.id, n, now=20.0)  # type: ignore[arg-type]
        await asyncio.gather(*tasks)
        assert len(tasks) == 2  # nonsense is not written
        with pytest.raises(ProxyError) as exc:
            await a.admit(k, now=30.0)
        assert (exc.value.status, exc.value.retry_after) == (429, 40)
        assert "1000 tokens per minute" in exc.value.message
        await b.admit(k, now=70.0)  # the 600 expired, 500 < 1000


async def test_shared_limit_admits_exactly_the_limit_under_a_race(tmp_path: Any) -> None:
    """Forty requests at once, spread over two storages on one file: exactly
    the limit gets through (the read and the count are one transaction)."""
    async with _shared_pair(tmp_path) as (stores, limiters, _):
        k = key(rpm=7)

        async def one(i: int) -> bool:
            try:
                await limiters[i % 2].admit(k, now=500.0 + i / 100)
                return True
            except ProxyError:
                return False

        admitted = await asyncio.gather(*(one(i) for i in range(40)))
        assert sum(admitted) == 7


async def test_a_refused_flood_does_not_reach_the_database(tmp_path: Any) -> None:
    """An over-limit key hammering one process: the refusals after the first
    are answered from memory until the wait they named ends, concurrent
    requests of one key take turns (one transaction at a time), and another
    process, which never saw the refusal, still counts exactly."""
    async with _shared_pair(tmp_path) as (stores, (a, b), _):
        k = key(rpm=2)
        await a.admit(k, now=100.0)
        await a.admit(k, now=100.5)
        assert a.transactions == 2

        async def one(now: float) -> ProxyError | None:
            try:
                await a.admit(k, now=now)
            except ProxyError as exc:
                return exc
            return None

        errs = await asyncio.gather(*(one(101.0 + i / 1000) for i in range(200)))
        assert all(e is not None and e.status == 429 for e in errs)
        assert a.transactions == 3  # the first refusal asked the database; the other 199 did not
        assert {e.retry_after for e in errs if e} == {59}  # 160 - 101.x, rounded up
        assert "2 requests per minute" in errs[-1].message  # type: ignore[union-attr]
        err = await one(159.5)
        assert err is not None and err.retry_after == 1 and a.transactions == 3
        with pytest.raises(ProxyError):
            await b.admit(k, now=120.0)  # the other process reads the table
        assert b.transactions == 1
        await a.admit(key(rpm=3), now=121.0)  # a raised limit is not the remembered refusal: admitted
        assert a.transactions == 4
        await a.admit(k, now=160.0)  # the wait named has passed: the database decides, and there is room
        assert a.transactions == 5
        rows = await stores[0]._in_thread_tx(lambda c: c.execute(
            "SELECT second, requests FROM rate_windows WHERE key_id = ? ORDER BY second", (k.id,)).fetchall(), fold=False)
        assert [tuple(r) for r in rows] == [(100, 2), (121, 1), (160, 1)]  # refusals were never counted
        assert not a._lines  # no lock left behind per key


async def _write_locked(tmp_path: Any, seconds: float) -> None:
    """Hold the SQLite file's write lock from a connection of its own (another
    process's long transaction) for ``seconds``: the storages' transactions
    then wait on aiosqlite's thread, so a ``rate_take`` really suspends."""
    conn = sqlite3.connect(str(tmp_path / "limits.db"), isolation_level=None, check_same_thread=False)
    try:
        conn.execute("BEGIN IMMEDIATE")
        await asyncio.sleep(seconds)
        conn.execute("COMMIT")
    finally:
        conn.close()


async def test_requests_of_one_key_take_turns_and_reuse_a_refusal_found_while_they_waited(tmp_path: Any) -> None:
    async with _shared_pair(tmp_path) as (stores, (a, _), _):
        k = key(rpm=2)
        await a.admit(k, now=100.0)
        await a.admit(k, now=100.5)
        t0 = a.transactions
        locker = asyncio.create_task(_write_locked(tmp_path, 0.4))
        await asyncio.sleep(0.05)

        async def one(i: int) -> ProxyError | None:
            try:
                await a.admit(k, now=101.0 + i / 1000)
            except ProxyError as exc:
                return exc
            return None

        errs = await asyncio.gather(*(one(i) for i in range(50)))
        await locker
        assert all(e is not None and e.status == 429 for e in errs)
        # one waited for the database and was refused; the 49 in line behind it
        # found that refusal when their turn came, without a transaction
        assert a.transactions - t0 == 1
        assert not a._lines


async def test_no_request_waits_in_line_longer_than_the_line_timeout(tmp_path: Any) -> None:
    """The database holds the first request of a key for 0.6 s: the others of
    that key give up after line_timeout with a storage error (a 503 to the
    client), the first is answered when the database is, and the line is gone."""
    async with _shared_pair(tmp_path) as (stores, _, _):
        limiter = SharedRateLimiter(stores[0], lambda coro: None, line_timeout=0.2)
        k = key(rpm=100)
        locker = asyncio.create_task(_write_locked(tmp_path, 0.6))
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()

        async def one(i: int) -> tuple[str, float]:
            t = loop.time()
            try:
                await limiter.admit(k, now=200.0 + i / 1000)
                return "admitted", loop.time() - t
            except StorageError:
                return "timed out", loop.time() - t

        results = await asyncio.gather(*(one(i) for i in range(10)))
        await locker
        outcomes = sorted(r for r, _ in results)
        assert outcomes == ["admitted"] + ["timed out"] * 9
        admitted_after = [dt for r, dt in results if r == "admitted"][0]
        assert admitted_after > 0.45  # it waited for the database itself (held 0.55 s from here)
        # a timeout never fires early; the waiters gave up while the database still held the first
        # (an order, not a wall-clock ceiling: a loaded machine may wake them late)
        assert all(0.15 < dt < admitted_after for r, dt in results if r == "timed out")
        assert limiter.transactions == 1 and not limiter._lines
        await limiter.admit(k, now=201.0)  # the database answers again: so does the limiter
        assert limiter.transactions == 2


async def test_remembered_refusals_are_bounded(tmp_path: Any) -> None:
    async with _shared_pair(tmp_path) as (stores, _, _):
        limiter = SharedRateLimiter(stores[0], lambda coro: None, max_refusals=8)
        for i in range(40):
            k = key(f"key_{i}", rpm=1)
            await limiter.admit(k, now=300.0)
            with pytest.raises(ProxyError):
                await limiter.admit(k, now=300.5)
            assert len(limiter._refused) <= 8
        newest = limiter.transactions
        with pytest.raises(ProxyError):
            await limiter.admit(key("key_39", rpm=1), now=301.0)  # the newest refusal is still remembered
        assert limiter.transactions == newest
        with pytest.raises(ProxyError):
            await limiter.admit(key("key_0", rpm=1), now=301.0)  # the oldest was dropped: the database says it again
        assert limiter.transactions == newest + 1


async def test_a_clock_step_back_does_not_stretch_a_remembered_refusal(tmp_path: Any) -> None:
    async with _shared_pair(tmp_path) as (stores, (a, _), _):
        k = key(rpm=1)
        await a.admit(k, now=1000.0)
        with pytest.raises(ProxyError):
            await a.admit(k, now=1001.0)  # remembered until 1060
        with pytest.raises(ProxyError):
            await a.admit(k, now=900.0)  # the wall clock went back 100 s: not answered from memory ...
        assert a.transactions == 3  # ... the database is asked (and still counts the request at 1000)


def test_rate_limits_setting_picks_the_store() -> None:
    s = ServerConfig()
    assert s.rate_limits == "auto" and not s.shared_rate_limits() and s.shared_rate_limits(workers=2)
    assert ServerConfig(database="postgresql://db/x").shared_rate_limits()
    assert ServerConfig(rate_limits="database").shared_rate_limits()
    assert not ServerConfig(rate_limits="memory", database="postgresql://db/x").shared_rate_limits(workers=4)
    with pytest.raises(ValueError, match="rate_limits"):
        ServerConfig(rate_limits="redis")


def test_a_backend_without_rate_methods_counts_in_memory_or_is_refused(tmp_path: Any) -> None:
    from cheapproxy.app import _shared_limits
    from cheapproxy.config import parse_config
    from cheapproxy.errors import ConfigError

    class OldBackend:  # a storage plugin written before the rate methods
        pass

    auto = parse_config({"server": {"database": "custom://x"}}, file="c.toml")
    assert _shared_limits(auto, SQLiteStorage("sqlite://:memory:"), 1) is True
    assert _shared_limits(auto, OldBackend(), 2) is False
    forced = parse_config({"server": {"database": "custom://x", "rate_limits": "database"}}, file="c.toml")
    with pytest.raises(ConfigError, match="rate_limits.*OldBackend"):
        _shared_limits(forced, OldBackend(), 1)
    alone = parse_config({"server": {"rate_limits": "auto"}}, file="c.toml")
    assert _shared_limits(alone, SQLiteStorage("sqlite://:memory:"), 1) is False
    assert _shared_limits(alone, SQLiteStorage("sqlite://:memory:"), 3) is True


async def test_the_sweeper_deletes_old_counts_through_an_index(tmp_path: Any) -> None:
    """rate_prune deletes by second alone (rate_take leaves old rows to it):
    it must not read every key's rows inside its write transaction."""
    async with _shared_pair(tmp_path) as (stores, _, _):
        plan = await stores[0]._in_thread_tx(lambda c: c.execute(
            "EXPLAIN QUERY PLAN DELETE FROM rate_windows WHERE second <= ?", (5,)).fetchall(), fold=False)
        assert "USING COVERING INDEX rate_windows_second" in " ".join(str(tuple(r)) for r in plan)
