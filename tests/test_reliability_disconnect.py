"""Client disconnects before the first token, mid-stream and right after the
end; a client that stops reading.  Policy (docs/reliability.md): before the
first byte the upstream request is closed at once and nothing is charged;
mid-stream the upstream is read on for at most [server] drain_seconds to learn
its usage, then closed, and what was streamed is charged exactly once.
Afterwards no hold, pool slot, upstream connection, watcher entry or task is
left behind."""

import asyncio
import json
import sqlite3

import aiohttp
import pytest

from .reliability_util import (Fault, body_for, eventually, faults, headers_for, model_toml, PATHS, post,  # noqa: F401
                               request_tasks, settle, streamed_text)

PRICE = {"input": 1, "output": 2}  # USD per 1M tokens


async def make(gateway, fault, protocol="openai-chat", *, drain=0.0, upstream_protocol=None):
    up = upstream_protocol or protocol
    return await gateway(fault.toml("up", up, first_byte_timeout=30, idle_timeout=30) + model_toml("m", "up")
                         + f"[routing]\nretries = 0\n[server]\ndrain_seconds = {drain}\ndisconnect_check_seconds = 0.05\n",
                         production=True)


async def open_stream(gw, protocol, text="hello"):
    session = aiohttp.ClientSession()
    task = asyncio.create_task(session.post(gw.url + PATHS[protocol], headers=headers_for(protocol, gw.key),
                                            data=json.dumps(body_for(protocol, "m", text, stream=True))))
    return session, task


async def read_until(resp, protocol, text):
    got = b""
    while text not in streamed_text(protocol, got):
        chunk = await resp.content.readany()
        assert chunk, got
        got += chunk
    return got


async def assert_nothing_left(gw, baseline_tasks):
    await settle(gw)
    proxy = gw.proxy
    client = proxy.clients["up"]
    assert await gw.storage.open_holds() == 0
    assert not proxy.streams and len(proxy.watcher) == 0 and proxy.inflight == 0
    assert client.busy == 0 and client.connections_in_use == 0  # no pool slot, no upstream socket in use
    # no request handler, settlement or watcher task, and no client connection, is left
    await eventually(lambda: request_tasks() == [] and not gw.server.runner.server.connections)
    assert len(asyncio.all_tasks()) <= baseline_tasks + 1  # + the task poller (upstream connections run no task)


@pytest.mark.parametrize("protocol", ["openai-chat", "anthropic-messages"])
@pytest.mark.parametrize("kind", ["stall_headers", "stall_accept"])
async def test_disconnect_before_first_token_cancels_the_upstream(gateway, faults, protocol, kind):
    fault = await faults(default=Fault(kind=kind))
    gw = await make(gateway, fault, protocol, drain=5.0)
    baseline = len(asyncio.all_tasks())
    session, task = await open_stream(gw, protocol)
    await eventually(lambda: fault.attempts() == 1)
    left = asyncio.get_running_loop().time()
    task.cancel()  # the client gives up while the upstream is still thinking
    await session.close()
    # the gateway noticed and closed the upstream request (no drain: nothing was streamed)
    await eventually(lambda: fault.log[0]["peer_closed"])
    print(f"\nupstream closed {1000 * (asyncio.get_running_loop().time() - left):.0f} ms after the client left "
          f"(disconnect_check_seconds 0.05)")
    await settle(gw)
    [rec] = await gw.storage.list_usage()
    assert rec.status == "cancelled" and rec.http_status == 499 and rec.cost == 0
    assert await gw.balance() == 10 and gw.proxy.watcher.interrupted == 1
    await assert_nothing_left(gw, baseline)


@pytest.mark.parametrize("route", [("openai-chat", None), ("anthropic-messages", None), ("openai-chat", "anthropic-messages")],
                         ids=["relay-openai", "relay-anthropic", "translated"])
async def test_disconnect_mid_stream_without_drain_closes_and_charges_what_was_streamed(gateway, faults, route):
    protocol, up = route
    gate = asyncio.Event()
    fault = await faults(default=Fault(chunks=6, gate=gate, hold_after=2))
    gw = await make(gateway, fault, protocol, drain=0.0, upstream_protocol=up)
    baseline = len(asyncio.all_tasks())
    session, task = await open_stream(gw, protocol)
    resp = await task
    got = await read_until(resp, protocol, "t0 t1 ")
    resp.close()
    await session.close()
    await eventually(lambda: fault.log[0]["peer_closed"])  # closed at once, not read to the end
    assert not fault.log[0]["finished"]
    await settle(gw)
    [rec] = await gw.storage.list_usage()
    assert rec.status == "cancelled" and rec.streamed and rec.cost > 0  # what was streamed is charged
    assert rec.input_tokens >= 1 and rec.output_tokens >= 1
    user = await gw.storage.get_user(gw.user)
    assert [e.kind for e in await gw.storage.ledger(user.id)].count("charge") == 1
    assert streamed_text(protocol, got).startswith("t0 t1 ")
    await assert_nothing_left(gw, baseline)


@pytest.mark.parametrize("route", [("openai-chat", None), ("anthropic-messages", None), ("openai-chat", "anthropic-messages")],
                         ids=["relay-openai", "relay-anthropic", "translated"])
async def test_disconnect_mid_stream_drains_for_the_upstream_usage(gateway, faults, route):
    protocol, up = route
    gate = asyncio.Event()
    fault = await faults(default=Fault(chunks=6, gate=gate, hold_after=2))
    gw = await make(gateway, fault, protocol, drain=5.0, upstream_protocol=up)
    baseline = len(asyncio.all_tasks())
    session, task = await open_stream(gw, protocol)
    resp = await task
    await read_until(resp, protocol, "t0 t1 ")
    resp.close()
    await session.close()
    await eventually(lambda: gw.proxy.watcher.interrupted == 1)  # noticed while blocked on the upstream
    assert len(request_tasks()) >= 1 and gw.proxy.inflight == 1  # the handler is draining
    gate.set()  # the upstream finishes within drain_seconds
    await eventually(lambda: fault.log[0]["finished"])
    await settle(gw)
    [rec] = await gw.storage.list_usage()
    # the upstream's own final usage: 11 prompt + 6 output tokens
    assert rec.status == "cancelled" and rec.usage_source == "upstream"
    assert (rec.input_tokens, rec.output_tokens) == (11, 6)
    assert str(rec.cost) == "0.000023"
    await assert_nothing_left(gw, baseline)


@pytest.mark.parametrize("protocol", ["openai-chat", "anthropic-messages"])
async def test_drain_is_capped(gateway, faults, protocol):
    gate = asyncio.Event()  # never opened: the upstream stalls after the client left
    fault = await faults(default=Fault(chunks=6, gate=gate, hold_after=2))
    gw = await make(gateway, fault, protocol, drain=0.3)
    baseline = len(asyncio.all_tasks())
    session, task = await open_stream(gw, protocol)
    resp = await task
    await read_until(resp, protocol, "t0 t1 ")
    resp.close()
    await session.close()
    await eventually(lambda: fault.log[0]["peer_closed"])  # given up after drain_seconds
    await settle(gw)
    [rec] = await gw.storage.list_usage()
    assert rec.status == "cancelled" and rec.usage_source == "estimated" and rec.cost > 0
    # a relay does not decode the stream: a token is estimated per frame the
    # client got (OpenAI: the role chunk and two deltas; Anthropic:
    # message_start, content_block_start and two deltas), not one for it all
    # (the frame size is the mean of the first read with output, so a few either way)
    assert 2 <= rec.output_tokens <= 5
    await assert_nothing_left(gw, baseline)


@pytest.mark.parametrize("protocol", ["openai-chat", "anthropic-messages"])
async def test_disconnect_right_after_the_end_is_a_normal_charge(gateway, faults, protocol):
    fault = await faults(default=Fault(chunks=4))
    gw = await make(gateway, fault, protocol)
    baseline = len(asyncio.all_tasks())
    session, task = await open_stream(gw, protocol)
    resp = await task
    marker = b"[DONE]" if protocol == "openai-chat" else b"message_stop"
    got = b""
    while marker not in got:
        got += await resp.content.readany()
    resp.close()
    await session.close()
    await settle(gw)
    [rec] = await gw.storage.list_usage()
    assert rec.status == "ok" and (rec.input_tokens, rec.output_tokens) == (11, 4) and rec.usage_source == "upstream"
    assert streamed_text(protocol, got) == "t0 t1 t2 t3 "
    await assert_nothing_left(gw, baseline)


async def test_a_client_that_stops_reading_is_cut_off_and_buffers_stay_bounded(gateway, faults):
    """A reader that never reads: aiohttp's write() waits at the transport's
    high-water mark, the gateway stops reading the upstream (TCP pushes back),
    and after send_timeout_seconds the client is cut off."""
    total = 400 * 2**20  # the upstream would send 400 MiB
    fault = await faults(default=Fault(chunks=total // 16384, piece_size=16384))
    gw = await gateway(fault.toml("up", "openai-chat") + model_toml("m", "up")
                       + "[server]\nsend_timeout_seconds = 0.5\ndrain_seconds = 0\n", production=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", int(gw.url.rsplit(":", 1)[1]))
    body = json.dumps(body_for("openai-chat", "m", stream=True)).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {gw.key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    await eventually(lambda: fault.attempts() == 1)
    # no reading from here on; the gateway gives up on us
    await eventually(lambda: fault.log[0]["peer_closed"], timeout=30)
    await settle(gw)
    [rec] = await gw.storage.list_usage()
    assert rec.status == "cancelled" and rec.cost > 0
    # the upstream could push only what socket buffers and bounded reads hold
    assert fault.written < 64 * 2**20, fault.written
    print(f"\nslow reader: upstream wrote {fault.written / 2**20:.1f} MiB of {total / 2**20:.0f} MiB before the cut")
    writer.close()


@pytest.mark.parametrize("client,upstream", [("openai-chat", "openai-chat"), ("anthropic-messages", "anthropic-messages"),
                                             ("openai-chat", "anthropic-messages")])
async def test_a_stream_ends_only_once_its_charge_is_durable(gateway, faults, client, upstream):
    """The end of a streamed answer (the end of its chunked body) leaves only
    after the request's charge is committed, like a
    non-streamed answer, so a crash of the process can never lose the charge
    of an answer the client got whole.  Here another connection holds the
    database's write lock: the answer must not end until it is let go."""
    fault = await faults(default=Fault(chunks=3))
    gw = await make(gateway, fault, client, upstream_protocol=upstream)
    # the key's lease is taken (a write) by a first request; the second is
    # served from it in memory, so only its charge needs the database
    status, _, _ = await post(gw, client, body_for(client, "m", stream=True))
    assert status == 200
    blocker = sqlite3.connect(gw.proxy.storage.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # no charge can commit now
        answer = asyncio.ensure_future(post(gw, client, body_for(client, "m", stream=True)))
        await asyncio.sleep(0.5)
        assert not answer.done(), "the answer ended before its charge was committed"
        blocker.execute("ROLLBACK")
        status, raw, _ = await asyncio.wait_for(answer, 10)
        assert status == 200
        assert streamed_text(client, raw) == "t0 t1 t2 "
    finally:
        blocker.close()
    await settle(gw)
    records = await gw.storage.list_usage()
    assert len(records) == 2 and all(r.status == "ok" and r.cost > 0 for r in records)
    assert await gw.storage.open_holds() == 0
