"""Overload and slow clients: in-flight limits answered at once with 503/429
and Retry-After, a deadline for request heads (slowloris) and bodies, header
size limits, and the body size limit."""

import asyncio
import json

import aiohttp
import pytest

from .reliability_util import (Fault, body_for, eventually, faults, headers_for, model_toml, port_of, post,  # noqa: F401
                               raw_request, settle, streamed_text)


async def held(gw, key, protocol="openai-chat"):
    return asyncio.create_task(post(gw, protocol, body_for(protocol, "m", stream=True), key=key))


def error_of(protocol, raw):
    body = json.loads(raw)
    return body["error"] if protocol != "anthropic-messages" else body["error"]


async def test_global_in_flight_limit_is_a_fast_503(gateway, faults):
    gate = asyncio.Event()
    fault = await faults(default=Fault(gate=gate, hold_after=1))
    gw = await gateway(fault.toml("up", "openai-chat") + model_toml("m", "up") + "[server]\nmax_in_flight = 2\n",
                       production=True)
    _, other = await gw.create_key()
    tasks = [await held(gw, gw.key), await held(gw, other)]
    await eventually(lambda: gw.proxy.inflight == 2)
    for protocol in ("openai-chat", "anthropic-messages"):
        status, raw, headers = await post(gw, protocol, body_for(protocol, "m"))
        assert status == 503 and headers["Retry-After"] == "1" and "capacity" in error_of(protocol, raw)["message"]
    assert fault.attempts() == 2  # refused before any upstream work
    gate.set()
    for t in tasks:
        status, raw, _ = await t
        assert status == 200 and streamed_text("openai-chat", raw) == "t0 t1 t2 "
    await eventually(lambda: gw.proxy.inflight == 0)  # settled, slots given back
    assert (await post(gw, "openai-chat", body_for("openai-chat", "m")))[0] == 200
    await settle(gw)
    recs = await gw.storage.list_usage()
    assert len(recs) == 3 and await gw.storage.open_holds() == 0  # refusals hold nothing and leave no record


async def test_per_key_in_flight_limit_is_429(gateway, faults):
    gate = asyncio.Event()
    fault = await faults(default=Fault(gate=gate, hold_after=1))
    gw = await gateway(fault.toml("up", "openai-chat") + model_toml("m", "up") + "[server]\nmax_in_flight_per_key = 1\n",
                       production=True)
    _, other = await gw.create_key()
    first = await held(gw, gw.key)
    await eventually(lambda: gw.proxy.inflight == 1)
    status, raw, headers = await post(gw, "anthropic-messages", body_for("anthropic-messages", "m"))
    assert status == 429 and headers["Retry-After"] == "1"
    assert json.loads(raw)["error"]["type"] == "rate_limit_error"
    second = await held(gw, other)  # another key is not affected
    await eventually(lambda: gw.proxy.inflight == 2)
    gate.set()
    assert (await first)[0] == 200 and (await second)[0] == 200
    assert fault.attempts() == 2


async def test_slowloris_headers_are_cut_at_the_header_deadline(gateway, faults):
    fault = await faults()
    gw = await gateway(fault.toml("up", "openai-chat") + model_toml("m", "up") + "[server]\nheader_timeout_seconds = 0.3\n",
                       production=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw.url))
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200
    sent = 0
    closed = False
    async with asyncio.timeout(10):
        for byte in head:  # one byte every 20 ms: the head would take 4 s
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                closed = True
                break
            sent += 1
            await asyncio.sleep(0.02)
            if reader.at_eof() or writer.transport.is_closing():
                closed = True
                break
        if not closed:
            closed = await reader.read() == b""
    writer.close()
    assert closed and sent < len(head)  # the server hung up before the head was complete
    # everyone else is served normally
    assert (await post(gw, "openai-chat", body_for("openai-chat", "m")))[0] == 200
    assert fault.attempts() == 1


@pytest.mark.parametrize("protocol", ["openai-chat", "anthropic-messages"])
async def test_slow_body_gets_408(gateway, faults, protocol):
    fault = await faults()
    gw = await gateway(fault.toml("up", protocol) + model_toml("m", "up") + "[server]\nbody_timeout_seconds = 0.3\n",
                       production=True)
    h = "".join(f"{k}: {v}\r\n" for k, v in headers_for(protocol, gw.key).items())
    path = "/v1/chat/completions" if protocol == "openai-chat" else "/v1/messages"
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n{h}\r\n".encode()
    data = await raw_request(port_of(gw.url), head, b'{"model": "m"')  # 13 of 1000 bytes, then silence
    status_line, _, rest = data.partition(b"\r\n")
    assert b" 408 " in status_line, data
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert "did not arrive within 0.3s" in json.dumps(body)
    assert fault.attempts() == 0


@pytest.mark.parametrize("protocol", ["openai-chat", "anthropic-messages"])
async def test_oversize_bodies_are_413_declared_or_chunked(gateway, faults, protocol):
    fault = await faults()
    gw = await gateway(fault.toml("up", protocol) + model_toml("m", "up") + "[server]\nmax_body_bytes = 2000\n",
                       production=True)
    big = json.dumps(body_for(protocol, "m", "x" * 3000)).encode()
    status, raw, _ = await post(gw, protocol, big)
    assert status == 413 and "2000 bytes" in json.dumps(json.loads(raw))

    async def chunks():
        for i in range(0, len(big), 500):
            yield big[i:i + 500]

    async with aiohttp.ClientSession() as s:  # no Content-Length: the limit applies while reading
        async with s.post(gw.url + ("/v1/chat/completions" if protocol == "openai-chat" else "/v1/messages"),
                          data=chunks(), headers=headers_for(protocol, gw.key)) as r:
            assert r.status == 413
    assert fault.attempts() == 0
    just_under = json.dumps(body_for(protocol, "m", "x" * 1500)).encode()
    assert len(just_under) < 2000 and (await post(gw, protocol, just_under))[0] == 200


async def test_header_limits(gateway, faults):
    fault = await faults()
    gw = await gateway(fault.toml("up", "openai-chat") + model_toml("m", "up"), production=True)
    port = port_of(gw.url)
    huge = await raw_request(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
    assert huge.split(b"\r\n")[0].endswith(b" 400 Bad Request"), huge[:80]
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    data = await raw_request(port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert data.split(b"\r\n")[0].endswith(b" 400 Bad Request"), data[:80]
    ok = await raw_request(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200")
