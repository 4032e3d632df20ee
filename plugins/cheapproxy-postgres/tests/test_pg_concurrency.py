"""Several gateway instances on one PostgreSQL database: two pools in one
process, and three real worker processes, racing holds, settlements,
releases and stale-hold sweeps on the same user."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import sys
from decimal import Decimal

from cheapproxy.storage.base import KeyRecord, UsageRecord
from cheapproxy_postgres.storage import PostgresStorage
from pg_testlib import ledger_sum, opened, raw, schema_url

D = Decimal
UTC = dt.timezone.utc


def record(rid: str, user_id: int, key_id: str | None = None) -> UsageRecord:
    return UsageRecord(request_id=rid, user_id=user_id, key_id=key_id, model="m1", upstream="up", protocol="openai-chat",
                       streamed=True, status="ok", input_tokens=10, output_tokens=7)


async def test_two_instances_race_200_holds_against_a_balance_for_10(pg_url: str, pg_schema: str) -> None:
    """$1.00 and holds of $0.10: at most 10 can be open at once.  200 holds
    split over two instances, each settled at $0.07 after a random delay."""
    a, b = await opened(pg_url), await opened(pg_url)
    try:
        user = await a.create_user("alice", D("1.00"))
        await a.create_key(KeyRecord(id="key_a", user_id=user.id, key_hash="f" * 64))
        admitted: list[str] = []
        open_now, most_open = [0], [0]

        async def one(s: PostgresStorage, i: int) -> None:
            hid = f"h{i}"
            if not await s.hold(hid, user_id=user.id, key_id="key_a", amount=D("0.10")):
                return
            admitted.append(hid)
            open_now[0] += 1
            most_open[0] = max(most_open[0], open_now[0])
            await asyncio.sleep(random.random() / 100)
            open_now[0] -= 1
            assert await s.settle(hid, cost=D("0.07"), record=record(f"r{i}", user.id, "key_a")) is not None

        await asyncio.gather(*(one(a if i % 2 else b, i) for i in range(200)))
        final = await b.get_user("alice")
        charges = [e for e in await a.ledger(user.id) if e.kind == "charge"]
        assert most_open[0] <= 10  # never more held than the balance covers
        assert len(admitted) == len(charges) and 10 <= len(admitted) <= 14  # floor(1.00 / 0.07) = 14
        assert final.held == 0 and final.balance >= 0
        assert D("1.00") - final.balance == -sum(e.amount for e in charges) == D("0.07") * len(charges)
        assert final.balance == await ledger_sum(b, user.id)
        assert min(e.balance_after for e in await a.ledger(user.id)) >= 0
        assert await a.open_holds() == 0 == await b.open_holds()
        assert (await a.get_key_by_hash("f" * 64)).spent == D("1.00") - final.balance
        rows = await raw(pg_schema, "SELECT held FROM api_keys WHERE id = 'key_a'")
        assert rows[0]["held"] == 0
        assert len(await b.list_usage(limit=10_000)) == len(admitted)
    finally:
        await a.close()
        await b.close()


async def test_settle_release_and_sweep_race_for_each_hold(pg_url: str) -> None:
    """Every hold is finished by a settle on one instance, a release on the
    other and a sweep on both at the same moment: exactly one wins each time."""
    a, b = await opened(pg_url), await opened(pg_url)
    try:
        user = await a.create_user("alice", D("10"))
        cutoff = dt.datetime.now(UTC) + dt.timedelta(hours=1)

        async def race(i: int) -> tuple[object, ...]:
            # one hold per round, so the sweeps compete for it like the two calls do
            assert await (a, b)[i % 2].hold(f"h{i}", user_id=user.id, key_id=None, amount=D("0.10"))
            calls = [a.settle(f"h{i}", cost=D("0.05"), record=record(f"r{i}", user.id)),
                     b.release(f"h{i}", record=record(f"x{i}", user.id)),
                     a.release_stale_holds(cutoff), b.release_stale_holds(cutoff)]
            order = list(range(4))
            random.Random(i).shuffle(order)
            tasks = {k: asyncio.ensure_future(calls[k]) for k in order}
            return tuple([await tasks[k] for k in range(4)])

        outcomes = [await race(i) for i in range(60)]
        settled = sum(1 for o in outcomes if o[0] is not None)
        released_by_call = sum(1 for o in outcomes if o[1] is True)
        swept = sum(o[2] + o[3] for o in outcomes)  # type: ignore[operator]
        assert settled + released_by_call + swept == 60  # each hold finished exactly once
        final = await b.get_user("alice")
        assert final.held == 0 and await a.open_holds() == 0
        assert final.balance == D(10) - D("0.05") * settled == await ledger_sum(a, user.id)
        assert len([e for e in await a.ledger(user.id) if e.kind == "charge"]) == settled
        assert len(await a.list_usage(limit=1000)) == settled + released_by_call
        assert a.conflict_retries == b.conflict_retries == 0
    finally:
        await a.close()
        await b.close()


WORKER = """
import asyncio, sys
from decimal import Decimal
from cheapproxy.storage.base import KeyRecord, UsageRecord
from cheapproxy_postgres.storage import PostgresStorage

async def main(url, tag):
    s = PostgresStorage(url)
    await s.open()
    user = await s.get_user("alice")
    async def one(i):
        hid = f"{tag}-{i}"
        if await s.hold(hid, user_id=user.id, key_id=None, amount=Decimal("0.05")):
            await asyncio.sleep(0.001)
            rec = UsageRecord(request_id=hid, user_id=user.id, key_id=None, model="m", upstream=None,
                              protocol="p", streamed=False, status="ok")
            await s.settle(hid, cost=Decimal("0.03"), record=rec)
            return 1
        return 0
    n = sum(await asyncio.gather(*(one(i) for i in range(150))))
    await s.close()
    print(n)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_worker_processes_share_the_database(pg_url: str) -> None:
    """Three real processes, each opening the backend itself (so they also race
    the migration check), race holds and settlements on one user."""
    s = await opened(pg_url)
    try:
        user = await s.create_user("alice", D("3"))
        procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", WORKER, pg_url, f"p{i}",
                                                      stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                 for i in range(3)]
        outs = [await p.communicate() for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], [o[1].decode()[-2000:] for o in outs]
        admitted = sum(int(o[0]) for o in outs)
        final = await s.get_user("alice")
        assert 60 <= admitted <= 100  # 3.00 / 0.03: holds of 0.05 may refuse a few near the end
        assert final.balance == D(3) - D("0.03") * admitted == await ledger_sum(s, user.id)
        assert final.balance >= 0 and final.held == 0 and await s.open_holds() == 0
    finally:
        await s.close()


KILLED = """
import asyncio, sys
from decimal import Decimal
from cheapproxy_postgres.storage import PostgresStorage

async def main(url):
    s = PostgresStorage(url)
    await s.open()
    a, b = await s.get_user("a"), await s.get_user("b")
    assert await s.hold("orphan", user_id=a.id, key_id=None, amount=Decimal("2"))  # committed, never settled

    async def half_transfer(db):
        # the first leg of a transfer, then the process dies holding both row locks
        await db.execute("SELECT 1 FROM users WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE", [a.id, b.id])
        await db.execute("UPDATE users SET balance = balance - 3000000 WHERE id = $1", a.id)
        print("inside", flush=True)
        await asyncio.sleep(3600)

    await s._write(half_transfer)

asyncio.run(main(sys.argv[1]))
"""


async def test_kill_9_mid_transaction_leaves_no_trace(pg_url: str) -> None:
    """Reliability test 39 on PostgreSQL: a gateway process SIGKILLed inside a
    transfer holding both row locks.  The server rolls it back and frees the
    locks; the other instance transfers at once; the orphaned hold it left is
    released by the stale-hold sweep; the books balance."""
    s = await opened(pg_url)
    try:
        a = await s.create_user("a", D("10"))
        b = await s.create_user("b", D("10"))
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", KILLED, pg_url,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line == b"inside\n", (await proc.stderr.read()).decode()[-2000:]
        proc.kill()
        assert await proc.wait() == -9
        # the dead session's locks go with it: this completes instead of waiting a minute
        got = await asyncio.wait_for(s.transfer(from_user_id=b.id, to_user_id=a.id, amount=D("1"), reference="after"), 15)
        assert got == (D(9), D(11))
        assert (await s.get_user("a")).held == D(2) and await s.open_holds() == 1
        assert await s.release_stale_holds(dt.datetime.now(UTC) + dt.timedelta(seconds=1)) == 1
        final = {u.name: u for u in await s.list_users()}
        assert (final["a"].balance, final["a"].held, final["b"].balance) == (D(11), D(0), D(9))
        for u in (a, b):
            assert final[u.name].balance == await ledger_sum(s, u.id)
    finally:
        await s.close()


async def test_two_instances_race_a_keys_rpm(pg_url: str, pg_schema: str) -> None:
    """Sixty admits at once of a key with rpm 9, split over two instances
    (two pools): exactly nine get through, and the window's rows say so;
    settled tokens written by either instance refuse the next request of a
    key with a tpm on the other."""
    from cheapproxy.errors import ProxyError
    from cheapproxy.ratelimit import SharedRateLimiter

    a, b = await opened(pg_url), await opened(pg_url)
    tasks: list[asyncio.Task] = []

    def track(coro):  # type: ignore[no-untyped-def]
        tasks.append(asyncio.get_running_loop().create_task(coro))

    try:
        limiters = [SharedRateLimiter(a, track), SharedRateLimiter(b, track)]
        k = KeyRecord(id="key_r", user_id=1, key_hash="e" * 64, rpm=9)

        async def one(i: int) -> bool:
            await asyncio.sleep(random.uniform(0, 0.01))
            try:
                await limiters[i % 2].admit(k, now=5000.0 + i / 1000)
                return True
            except ProxyError as err:
                assert err.status == 429 and err.retry_after is not None
                return False

        admitted = await asyncio.gather(*(one(i) for i in range(60)))
        assert sum(admitted) == 9
        rows = await raw(pg_schema, "SELECT SUM(requests) AS n FROM rate_windows WHERE key_id = 'key_r'")
        assert rows[0]["n"] == 9
        t = KeyRecord(id="key_t", user_id=1, key_hash="d" * 64, tpm=100)
        await limiters[0].admit(t, now=6000.0)
        limiters[0].add_tokens(t.id, 150, now=6000.0)
        await asyncio.gather(*tasks)
        try:
            await limiters[1].admit(t, now=6010.0)
            raise AssertionError("admitted over the tpm")
        except ProxyError as err:
            assert (err.status, err.retry_after) == (429, 50)
        assert await b.rate_prune(7000) >= 2
        assert (await raw(pg_schema, "SELECT COUNT(*) AS n FROM rate_windows"))[0]["n"] == 0
    finally:
        await a.close()
        await b.close()


async def test_rate_limit_holds_whatever_the_servers_default_isolation(pg_schema: str) -> None:
    """A database whose default isolation is REPEATABLE READ: a snapshot
    taken before the key's lock would miss the count committed by the
    instance that held it, so the rate transaction sets READ COMMITTED
    itself.  Three instances race sixty admits of a key with rpm 9."""
    from cheapproxy.errors import ProxyError
    from cheapproxy.ratelimit import SharedRateLimiter

    url = schema_url(pg_schema, default_transaction_isolation="repeatable%20read")
    stores = [await opened(url) for _ in range(3)]
    try:
        async with stores[0]._require().acquire() as conn:
            assert await conn.fetchval("SHOW default_transaction_isolation") == "repeatable read"
        limiters = [SharedRateLimiter(s, lambda coro: None) for s in stores]
        k = KeyRecord(id="key_i", user_id=1, key_hash="c" * 64, rpm=9)

        async def one(i: int) -> bool:
            await asyncio.sleep(random.uniform(0, 0.01))
            try:
                # each in a second of its own (one minute in all): the counts are separate rows,
                # so no row conflict would save a stale read
                await limiters[i % 3].admit(k, now=8000.0 + i * 0.9)
                return True
            except ProxyError:
                return False

        admitted = await asyncio.gather(*(one(i) for i in range(60)))
        assert sum(admitted) == 9
        rows = await raw(pg_schema, "SELECT SUM(requests) AS n FROM rate_windows WHERE key_id = 'key_i'")
        assert rows[0]["n"] == 9
    finally:
        for s in stores:
            await s.close()
