"""The provider plugin contract, as the core enforces it: a plugin that raises
before or during its answer costs that request a clean 502 (in the client's
shape, or the in-stream error event), never the worker; hostile usage never
makes a negative charge."""

import asyncio

import pytest

from cheapproxy import hookimpl, ir
from cheapproxy.default_plugins.demo import DemoProvider

from .reliability_util import body_for, model_toml, post, settle, stream_error, streamed_text


def provider(name, gen):
    cls = type(name.title(), (DemoProvider,), {"name": name, "generate": gen})

    class Plugin:
        @hookimpl
        def register_provider_types(self, register):
            register(cls)

    return (name, Plugin())


async def raises_first(self, request, upstream_model):
    raise RuntimeError("plugin bug before any event")
    yield  # pragma: no cover


async def raises_midway(self, request, upstream_model):
    yield ir.MessageStart(id="msg_x", model=upstream_model, usage=ir.Usage(input_tokens=40))
    yield ir.PartStart(index=0, part=ir.TextPart(text=""))
    yield ir.TextDelta(index=0, text="partial answer ")
    await asyncio.sleep(0)
    raise RuntimeError("plugin bug midway")


def hostile(usage):
    async def gen(self, request, upstream_model):
        yield ir.MessageStart(id="msg_h", model=upstream_model, usage=None)
        yield ir.PartStart(index=0, part=ir.TextPart(text=""))
        yield ir.TextDelta(index=0, text="ok")
        yield ir.PartStop(index=0)
        yield ir.MessageStop(stop_reason=ir.StopReason.END_TURN, usage=usage)
    return gen


async def gw_with(gateway, name, gen):
    return await gateway(f'[[upstreams]]\nname = "p"\nprovider = "{name}"\n[routing]\nretries = 0\n' + model_toml("m", "p"),
                         plugins=[provider(name, gen)], production=True)


@pytest.mark.parametrize("protocol", ["openai-chat", "anthropic-messages"])
async def test_a_plugin_that_raises_before_answering_is_a_502(gateway, protocol):
    gw = await gw_with(gateway, "boom", raises_first)
    for stream in (False, True):
        status, raw, headers = await post(gw, protocol, body_for(protocol, "m", stream=stream))
        assert status == 502 and headers["Content-Type"].startswith("application/json"), raw
        assert b"plugin bug" not in raw  # internals stay in the log
    await settle(gw)
    assert await gw.balance() == 10 and await gw.storage.open_holds() == 0
    assert (await post(gw, protocol, body_for(protocol, "demo")))[0] == 200  # the worker is fine


@pytest.mark.parametrize("protocol", ["openai-chat", "anthropic-messages"])
async def test_a_plugin_that_raises_midway_ends_the_stream_with_an_error(gateway, protocol):
    gw = await gw_with(gateway, "midway", raises_midway)
    status, raw, _ = await post(gw, protocol, body_for(protocol, "m", stream=True))
    assert status == 200 and streamed_text(protocol, raw) == "partial answer "
    assert stream_error(protocol, raw) is not None
    await settle(gw)
    [rec] = await gw.storage.list_usage()
    # charged for what was streamed: the reported prompt, the output counted locally
    assert rec.status == "incomplete" and rec.input_tokens == 40 and rec.output_tokens == 4 and rec.cost > 0


@pytest.mark.parametrize("usage", [ir.Usage(input_tokens=-1000, output_tokens=-5), ir.Usage(input_tokens=10**15, output_tokens=10**15),
                                   ir.Usage()], ids=["negative", "enormous", "zero"])
async def test_hostile_usage_never_charges_negative_or_unbounded(gateway, usage):
    gw = await gw_with(gateway, "hostile", hostile(usage))
    status, raw, _ = await post(gw, "openai-chat", body_for("openai-chat", "m"))
    assert status == 200
    await settle(gw)
    [rec] = await gw.storage.list_usage()
    assert 0 <= rec.cost <= 10**9 * 2 / 10**6 * 2  # at most MAX_TOKENS of each kind at the model's prices
    assert rec.input_tokens >= 0 and rec.output_tokens >= 0
    assert await gw.balance() >= 0
