"""Soak (marked ``soak``: ``-m 'not soak'`` leaves it out, CI runs it): a few
thousand streamed requests through every path (relay, translation, the demo
provider) with clients that leave at random points; afterwards open file
descriptors, asyncio tasks, open holds and RSS are back at the baseline taken
after a warm-up, and the ledger adds up.

Tolerances: file descriptors and tasks must come back exactly (plus one task:
the async-task poller sometimes sits in a timed wait); RSS may grow by at most
max(24 MiB, 15 %) -- CPython keeps freed arenas, and SQLite its page cache,
so RSS plateaus rather than falls; a leak of one 10 KiB buffer per request
would already exceed that over this run."""

import asyncio
import gc
import json
import os
import random
import time
from decimal import Decimal

import aiohttp
import pytest

from .reliability_util import (Fault, PATHS, body_for, eventually, faults, headers_for, model_toml,  # noqa: F401
                               open_fds, request_tasks, rss_bytes, settle)

REQUESTS = int(os.environ.get("CHEAPPROXY_SOAK_REQUESTS", "6000"))
CONCURRENCY = 24
ROUTES = [("openai-chat", "m-oa"), ("anthropic-messages", "m-an"), ("openai-chat", "m-an"),
          ("anthropic-messages", "m-oa"), ("openai-chat", "demo"), ("anthropic-messages", "demo")]


async def one(session, gw, rng, stats):
    protocol, model = rng.choice(ROUTES)
    mode = rng.random()
    url = gw.url + PATHS[protocol]
    data = json.dumps(body_for(protocol, model, "soak " * rng.randint(1, 30), stream=True))
    if mode < 0.1:  # leave before the first byte (or before the request was even read)
        task = asyncio.create_task(session.post(url, data=data, headers=headers_for(protocol, gw.key)))
        await asyncio.sleep(rng.random() * 0.02)
        task.cancel()
        try:
            r = await task
            r.close()
        except (asyncio.CancelledError, aiohttp.ClientError):
            pass
        stats["early"] += 1
        return
    async with session.post(url, data=data, headers=headers_for(protocol, gw.key)) as r:
        assert r.status == 200, await r.text()
        if mode < 0.35:  # leave mid-stream
            await r.content.readany()
            r.close()
            stats["mid"] += 1
            return
        raw = await r.read()
        assert (b"[DONE]" in raw) if protocol == "openai-chat" else (b"message_stop" in raw)
        stats["full"] += 1


async def phase(gw, n, seed, stats):
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        queue = list(range(n))

        async def worker():
            while queue:
                queue.pop()
                await one(session, gw, rng, stats)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def quiesce(gw, fault):
    await settle(gw)
    await eventually(lambda: not request_tasks() and not gw.server.runner.server.connections and fault.active == 0, 30)
    await eventually(lambda: fault.connections == 0, 30)  # idle upstream keep-alives closed (keepalive 0.5 s)
    await asyncio.sleep(0.2)
    gc.collect()
    return {"fds": open_fds(), "tasks": len(asyncio.all_tasks()), "rss": rss_bytes(),
            "holds": await gw.storage.open_holds()}


@pytest.fixture
def quiet_logs():
    """Info lines would pile up in pytest's capture buffer (this process's RSS)."""
    import logging

    import structlog

    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    yield
    structlog.configure(**saved)


@pytest.mark.soak
async def test_soak_streams_with_random_disconnects(gateway, faults, quiet_logs):
    fault = await faults(default=Fault(chunks=12, delay=0.001), keepalive_timeout=0.5, log_limit=100)
    gw = await gateway(fault.toml("oa", "openai-chat") + fault.toml("an", "anthropic-messages")
                       + model_toml("m-oa", "oa") + model_toml("m-an", "an")
                       + "[server]\ndrain_seconds = 0.2\nmax_in_flight_per_key = 1000\n", balance="1000", production=True)
    stats = {"early": 0, "mid": 0, "full": 0}
    await phase(gw, 300, 1, stats)  # warm-up: pools, caches, code paths
    base = await quiesce(gw, fault)
    started = time.monotonic()
    await phase(gw, REQUESTS, 2, stats)
    elapsed = time.monotonic() - started
    after = await quiesce(gw, fault)
    user = await gw.storage.get_user(gw.user)
    ledger = await gw.storage.ledger(user.id)
    usage = await gw.storage.list_usage(limit=100000)
    print(f"\nsoak: {REQUESTS} streamed requests in {elapsed:.1f}s ({REQUESTS / elapsed:.0f}/s), {stats}; "
          f"fds {base['fds']}->{after['fds']}, tasks {base['tasks']}->{after['tasks']}, "
          f"rss {base['rss'] / 2**20:.1f}->{after['rss'] / 2**20:.1f} MiB, holds {after['holds']}, "
          f"usage rows {len(usage)}, watcher interrupts {gw.proxy.watcher.interrupted}")
    assert after["holds"] == 0 and gw.proxy.inflight == 0 and not gw.proxy.streams
    assert after["fds"] <= base["fds"]
    assert after["tasks"] <= base["tasks"] + 1
    assert after["rss"] - base["rss"] <= max(24 * 2**20, 0.15 * base["rss"])
    assert all(c.busy == 0 for c in gw.proxy.clients.values())
    # every request that reached the gateway was recorded once, and the money adds up
    assert stats["full"] + stats["mid"] <= len(usage) <= 300 + REQUESTS
    assert len({r.request_id for r in usage}) == len(usage)
    assert user.balance == sum(e.amount for e in ledger) == Decimal(1000) - sum(r.cost for r in usage)
    assert {r.status for r in usage} <= {"ok", "cancelled", "incomplete"}
