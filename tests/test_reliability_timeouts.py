"""Timeouts per upstream (connect, first byte, idle gap; never a total), each
asserted by status, bytes, the ledger and the fault upstream's request log.

A stall before anything reached the client is a 504 in the client's shape; a
stall after is the protocol's in-stream error event, never a clean end."""

import asyncio
import json

import anthropic
import openai
import pytest

from .reliability_util import (Blackhole, Fault, body_for, clean_end, eventually, faults, model_toml, post,  # noqa: F401
                               settle, sse_frames, stream_error, streamed_text)

PROTOCOLS = ["openai-chat", "anthropic-messages"]
FAST = {"first_byte_timeout": 0.3, "idle_timeout": 0.3, "connect_timeout": 0.3}


async def make(gateway, fault, protocol, *, routing="retries = 0\n", **up):
    opts = dict(FAST, **up)
    return await gateway(fault.toml("up", protocol, **opts) + model_toml("m", "up") + "[routing]\n" + routing,
                         production=True)


def assert_error_shape(protocol, status, raw, expect):
    assert status == expect, (status, raw)
    body = json.loads(raw)
    if protocol == "openai-chat":
        assert set(body["error"]) >= {"message", "type", "param", "code"}
    else:
        assert body["type"] == "error" and body["error"]["type"] and body["error"]["message"]
    return body


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", ["stall_headers", "stall_accept"])
async def test_first_byte_stall_is_504_and_the_upstream_is_closed(gateway, faults, protocol, stream, kind):
    fault = await faults(default=Fault(kind=kind))
    gw = await make(gateway, fault, protocol)
    status, raw, headers = await post(gw, protocol, body_for(protocol, "m", stream=stream))
    body = assert_error_shape(protocol, status, raw, 504)
    assert headers["Content-Type"].startswith("application/json")  # never a half-opened event stream
    assert "first_byte_timeout" in json.dumps(body)
    assert fault.attempts() == 1
    await eventually(lambda: fault.log[0]["peer_closed"])  # the gateway hung up on the stalled upstream
    await settle(gw)
    assert await gw.balance() == 10 and await gw.storage.open_holds() == 0
    [rec] = await gw.storage.list_usage()
    assert rec.status == "error" and rec.http_status == 504 and rec.cost == 0 and rec.upstream == "up"


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("kind", ["stall_mid", "cut", "fin", "rst"])
async def test_mid_stream_stall_or_cut_ends_with_the_error_event(gateway, faults, protocol, kind):
    fault = await faults(default=Fault(kind=kind, chunks=2))
    gw = await make(gateway, fault, protocol)
    status, raw, _ = await post(gw, protocol, body_for(protocol, "m", stream=True))
    assert status == 200
    assert streamed_text(protocol, raw) == "t0 t1 "  # what was streamed, once
    err = stream_error(protocol, raw)
    assert err is not None and not clean_end(protocol, raw), raw
    if kind == "stall_mid":
        assert "idle_timeout" in err["message"]
        await eventually(lambda: fault.log[0]["peer_closed"])
    assert fault.attempts() == 1  # no retry after output began
    await settle(gw)
    [rec] = await gw.storage.list_usage()
    assert rec.status == "incomplete" and rec.streamed and rec.cost > 0  # charged for what was streamed
    assert rec.http_status == (504 if kind == "stall_mid" else 502)
    assert await gw.storage.open_holds() == 0


async def test_slow_stream_within_idle_timeout_is_not_cut(gateway, faults):
    """Gaps shorter than idle_timeout, a total far longer: no total timeout."""
    fault = await faults(default=Fault(chunks=8, delay=0.1))
    gw = await make(gateway, fault, "openai-chat", idle_timeout=0.5, first_byte_timeout=0.5)
    status, raw, _ = await post(gw, "openai-chat", body_for("openai-chat", "m", stream=True))
    assert status == 200 and clean_end("openai-chat", raw) and stream_error("openai-chat", raw) is None
    assert streamed_text("openai-chat", raw) == "".join(f"t{i} " for i in range(8))
    await settle(gw)
    [rec] = await gw.storage.list_usage()
    assert rec.status == "ok" and rec.output_tokens == 8 and rec.input_tokens == 11 and rec.usage_source == "upstream"


@pytest.mark.parametrize("with_end", [False, True], ids=["trailer-apart", "trailer-in-the-same-read"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_the_answer_ends_at_the_end_marker_while_the_upstream_lingers(gateway, faults, protocol, with_end):
    """An upstream that sends its end marker, then bytes after it, and keeps
    its body open: the client's response ends with the marker at once (not
    after the upstream's idle timeout, and with no error event after a clean
    end), the bytes after the marker never reach the client, and the
    upstream's usage is charged.  The gateway then reads the upstream for at
    most drain_seconds and hangs up."""
    fault = await faults(default=Fault(kind="linger", chunks=3, trailer=b"data: junk after the end\n\n", trailer_with_end=with_end))
    gw = await make(gateway, fault, protocol, routing="retries = 0\n[server]\ndrain_seconds = 0.3\n",
                    idle_timeout=30, first_byte_timeout=5)
    status, raw, _ = await asyncio.wait_for(post(gw, protocol, body_for(protocol, "m", stream=True)), 5)
    assert status == 200 and clean_end(protocol, raw) and stream_error(protocol, raw) is None, raw
    assert b"junk" not in raw
    assert streamed_text(protocol, raw) == "t0 t1 t2 "
    await eventually(lambda: fault.log[0]["peer_closed"])
    await settle(gw)
    [rec] = await gw.storage.list_usage()
    assert rec.status == "ok" and rec.usage_source == "upstream" and (rec.input_tokens, rec.output_tokens) == (11, 3)
    assert await gw.storage.open_holds() == 0


@pytest.mark.parametrize("with_end", [False, True], ids=["trailer-apart", "trailer-in-the-same-read"])
@pytest.mark.parametrize("client,upstream", [("openai-chat", "anthropic-messages"), ("anthropic-messages", "openai-chat")])
async def test_a_translated_answer_ends_at_the_end_marker_while_the_upstream_lingers(gateway, faults, client, upstream,
                                                                                      with_end):
    """The same for a translated stream: the client's answer ends with its
    own protocol's end (OpenAI's usage chunk and [DONE], Anthropic's
    message_stop) as soon as the upstream's end marker arrives -- before this
    it waited for the upstream's body to end, i.e. its idle timeout, and then
    sent an error event after the clean end."""
    fault = await faults(default=Fault(kind="linger", chunks=3, trailer=b"data: junk after the end\n\n", trailer_with_end=with_end))
    gw = await make(gateway, fault, upstream, routing="retries = 0\n[server]\ndrain_seconds = 0.3\n",
                    idle_timeout=30, first_byte_timeout=5)
    body = body_for(client, "m", stream=True)
    if client == "openai-chat":
        body["stream_options"] = {"include_usage": True}
    status, raw, _ = await asyncio.wait_for(post(gw, client, body), 5)
    assert status == 200 and clean_end(client, raw) and stream_error(client, raw) is None, raw
    assert b"junk" not in raw
    assert streamed_text(client, raw) == "t0 t1 t2 "
    if client == "openai-chat":
        # the usage chunk, then [DONE], each once, at the very end
        frames = [d for _, d in sse_frames(raw)]
        assert frames[-1] == "[DONE]" and frames.count("[DONE]") == 1
        assert json.loads(frames[-2])["usage"]["completion_tokens"] == 3
    await eventually(lambda: fault.log[0]["peer_closed"])  # read aside for drain_seconds, then closed
    await settle(gw)
    [rec] = await gw.storage.list_usage()
    assert rec.status == "ok" and rec.usage_source == "upstream" and (rec.input_tokens, rec.output_tokens) == (11, 3)
    assert await gw.storage.open_holds() == 0


async def test_connect_timeout_is_504(gateway):
    hole = Blackhole()
    try:
        gw = await gateway(f"""
[[upstreams]]
name = "hole"
provider = "openai"
base_url = "http://127.0.0.1:{hole.port}/v1"
api_key = "upstream-secret"
connect_timeout = 0.2
first_byte_timeout = 5
[routing]
retries = 0
""" + model_toml("m", "hole"), production=True)
        status, raw, _ = await post(gw, "openai-chat", body_for("openai-chat", "m"))
        body = assert_error_shape("openai-chat", status, raw, 504)
        assert "connect_timeout" in body["error"]["message"]
    finally:
        hole.close()


async def test_sdk_clients_see_504_and_in_stream_errors(gateway, faults):
    """The official SDKs: a non-streamed stall raises their 504 error; a mid-stream
    stall raises their stream error after the text that did arrive, translated
    (OpenAI client -> Anthropic upstream) and relayed."""
    fault = await faults()
    gw = await gateway(fault.toml("oa", "openai-chat", **FAST) + fault.toml("an", "anthropic-messages", **FAST)
                       + model_toml("m-oa", "oa") + model_toml("m-an", "an") + "[routing]\nretries = 0\n", production=True)
    oa = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    an = anthropic.AsyncAnthropic(base_url=gw.url, api_key=gw.key, max_retries=0)
    for model in ("m-oa", "m-an"):
        fault.script(Fault(kind="stall_headers"))
        with pytest.raises(openai.APIStatusError) as e:
            await oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 504
        fault.script(Fault(kind="stall_headers"))
        with pytest.raises(anthropic.APIStatusError) as e2:
            await an.messages.create(model=model, max_tokens=50, messages=[{"role": "user", "content": "x"}])
        assert e2.value.status_code == 504
        fault.script(Fault(kind="stall_mid", chunks=2))
        got = ""
        with pytest.raises(openai.APIError):
            async for chunk in await oa.chat.completions.create(model=model, stream=True,
                                                                messages=[{"role": "user", "content": "x"}]):
                if chunk.choices and chunk.choices[0].delta.content:
                    got += chunk.choices[0].delta.content
        assert got == "t0 t1 "
        fault.script(Fault(kind="stall_mid", chunks=2))
        got = ""
        with pytest.raises(anthropic.APIStatusError):
            async with an.messages.stream(model=model, max_tokens=50, messages=[{"role": "user", "content": "x"}]) as s:
                async for text in s.text_stream:
                    got += text
        assert got == "t0 t1 "
    assert fault.attempts() == 8
    await settle(gw)
    recs = await gw.storage.list_usage()
    assert sorted(r.status for r in recs) == ["error"] * 4 + ["incomplete"] * 4
    assert all((r.cost > 0) == (r.status == "incomplete") for r in recs)


async def test_hung_provider_plugin_is_504(gateway):
    """A provider plugin without HTTP that never yields is bounded like an upstream."""
    import asyncio

    from cheapproxy import hookimpl
    from cheapproxy.default_plugins.demo import DemoProvider

    class Hung(DemoProvider):
        name = "hung"

        async def generate(self, request, upstream_model):
            await asyncio.sleep(3600)
            yield  # pragma: no cover

    class Plugin:
        @hookimpl
        def register_provider_types(self, register):
            register(Hung)

    gw = await gateway('[[upstreams]]\nname = "h"\nprovider = "hung"\nfirst_byte_timeout = 0.2\n[routing]\nretries = 0\n'
                       + model_toml("m", "h"), plugins=[("hung", Plugin())], production=True)
    for stream in (False, True):
        status, raw, _ = await post(gw, "openai-chat", body_for("openai-chat", "m", stream=stream))
        assert_error_shape("openai-chat", status, raw, 504)
    await settle(gw)
    assert await gw.balance() == 10
