"""Per-key rate limits: rolling-minute rpm and tpm, Retry-After, bounded memory."""

from __future__ import annotations

import hashlib

import pytest

from cheapproxy.errors import ProxyError
from cheapproxy.ratelimit import RateLimiter
from cheapproxy.storage.base import KeyRecord


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
