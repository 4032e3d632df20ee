"""Graceful shutdown of a real ``cheapproxy serve`` process: on SIGTERM
/health reports draining, new requests get 503 in the client's shape with
Retry-After, in-flight streams finish within [server] shutdown_grace_seconds,
streams still open after it end with the protocol's error event, every charge
is in the database, and the process exits 0."""

import asyncio
import json
import signal
from decimal import Decimal

import aiohttp

from cheapproxy.storage.sqlite import SQLiteStorage

from .reliability_util import (Fault, PATHS, ServeProcess, body_for, clean_end, eventually, faults, headers_for,  # noqa: F401
                               model_toml, stream_error, streamed_text)


async def serve_with(tmp_path, fault, grace):
    cfg = (f"shutdown_grace_seconds = {grace}\n" + fault.toml("oa", "openai-chat") + fault.toml("an", "anthropic-messages")
           + model_toml("m-oa", "oa") + model_toml("m-an", "an") + "[routing]\nretries = 0\n")
    sp = ServeProcess(tmp_path, cfg)
    await sp.cli("users", "add", "bob", "--balance", "10", "--json")
    _, out, _ = await sp.cli("keys", "create", "bob", "--json")
    await sp.start()
    return sp, json.loads(out)["key"]


class Stream:
    """A streamed request read incrementally by the test."""

    def __init__(self, session, url, protocol, model, key):
        self.protocol = protocol
        self.raw = b""
        self.task = asyncio.create_task(self._run(session, url, protocol, model, key))

    async def _run(self, session, url, protocol, model, key):
        async with session.post(url + PATHS[protocol], headers=headers_for(protocol, key),
                                data=json.dumps(body_for(protocol, model, stream=True))) as r:
            self.status = r.status
            while chunk := await r.content.readany():
                self.raw += chunk
        return self

    @property
    def text(self):
        return streamed_text(self.protocol, self.raw)


async def ledger_state(sp):
    store = SQLiteStorage(f"sqlite:///{sp.db}", ".")
    await store.open()
    try:
        bob = await store.get_user("bob")
        return await store.list_usage(), await store.open_holds(), bob, await store.ledger(bob.id)
    finally:
        await store.close()


async def test_sigterm_drains_in_flight_streams_then_exits_0(tmp_path, faults):
    gate = asyncio.Event()
    fault = await faults(default=Fault(chunks=4, gate=gate, hold_after=1))
    sp, key = await serve_with(tmp_path, fault, grace=30)
    try:
        async with aiohttp.ClientSession() as s:
            streams = [Stream(s, sp.url, p, m, key) for p, m in
                       [("openai-chat", "m-oa"), ("anthropic-messages", "m-an"), ("openai-chat", "m-an")]]
            await eventually(lambda: all(st.text == "t0 " for st in streams), timeout=20)
            sp.signal(signal.SIGTERM)
            # readiness flips at once, while the streams are still running
            async def draining():
                async with s.get(sp.url + "/health") as r:
                    return r.status == 503 and (await r.json())["status"] == "draining"
            async with asyncio.timeout(10):
                while not await draining():
                    await asyncio.sleep(0.02)
            for protocol, model in (("openai-chat", "m-oa"), ("anthropic-messages", "m-an")):
                async with s.post(sp.url + PATHS[protocol], headers=headers_for(protocol, key),
                                  data=json.dumps(body_for(protocol, model))) as r:
                    body = await r.json()
                    assert r.status == 503 and r.headers["Retry-After"] == "1", body
                    assert ("error" in body) if protocol == "openai-chat" else body["type"] == "error"
            assert fault.attempts() == 3  # the refused requests never reached the upstream
            gate.set()
            done = await asyncio.gather(*(st.task for st in streams))
        assert await sp.wait() == 0
        for st in done:
            assert st.status == 200 and st.text == "t0 t1 t2 t3 " and clean_end(st.protocol, st.raw)
            assert stream_error(st.protocol, st.raw) is None
        usage, holds, bob, ledger = await ledger_state(sp)
        assert holds == 0
        assert sorted(r.status for r in usage) == ["ok", "ok", "ok"]
        charged = [r.cost for r in usage]
        assert all(c > 0 for c in charged)
        assert bob.balance == Decimal(10) - sum(charged) == sum(e.amount for e in ledger)
        assert '"shutdown.draining"' in sp.stderr and '"shutdown.done"' in sp.stderr
    finally:
        await sp.stop()


async def test_streams_still_open_after_the_grace_end_with_the_error_event(tmp_path, faults):
    gate = asyncio.Event()  # never opened
    fault = await faults(default=Fault(chunks=4, gate=gate, hold_after=2))
    sp, key = await serve_with(tmp_path, fault, grace=0.5)
    try:
        async with aiohttp.ClientSession() as s:
            streams = [Stream(s, sp.url, p, m, key) for p, m in
                       [("openai-chat", "m-oa"), ("anthropic-messages", "m-an"), ("anthropic-messages", "m-oa")]]
            await eventually(lambda: all(st.text == "t0 t1 " for st in streams), timeout=20)
            fault.script(Fault(kind="stall_headers"))
            waiting = asyncio.create_task(s.post(sp.url + PATHS["openai-chat"], headers=headers_for("openai-chat", key),
                                                 data=json.dumps(body_for("openai-chat", "m-oa", stream=True))))
            await eventually(lambda: fault.attempts() == 4, timeout=20)
            sp.signal(signal.SIGTERM)
            done = await asyncio.gather(*(st.task for st in streams))
            r = await waiting
            assert r.status == 503 and "shutting down" in (await r.json())["error"]["message"]
            r.release()
        assert await sp.wait() == 0
        for st in done:
            err = stream_error(st.protocol, st.raw)
            assert st.text == "t0 t1 " and err is not None and "shutting down" in err["message"], st.raw
            assert not clean_end(st.protocol, st.raw)
        usage, holds, bob, ledger = await ledger_state(sp)
        assert holds == 0 and len(usage) == 4
        ended = [r for r in usage if r.streamed and r.cost > 0]
        assert sorted(r.status for r in ended) == ["incomplete"] * 3  # charged for what was streamed
        [refused] = [r for r in usage if r.cost == 0]
        assert refused.http_status == 503
        assert bob.balance == Decimal(10) - sum(r.cost for r in usage) == sum(e.amount for e in ledger)
    finally:
        await sp.stop()
