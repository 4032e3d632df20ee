"""Same-protocol relay through real loopback fake upstreams, driven by the
official SDKs: the upstream sees its own credential and the upstream model
name, never the client's key; answers, streams and usage arrive intact."""

import asyncio

import aiohttp
import anthropic
import openai
import pytest
from google import genai
from google.genai import types as gtypes

from cheapproxy.testing.fixtures import UPSTREAM_SECRET


def model_toml(name, upstream, upstream_model=None, **price):
    price = price or {"input": 3, "output": 15, "cache_write": 3.75, "cache_read": 0.3}
    s = f'[[models]]\nname = "{name}"\nupstream = "{upstream}"\n'
    if upstream_model:
        s += f'upstream_model = "{upstream_model}"\n'
    s += "[models.price]\n" + "".join(f"{k} = {v}\n" for k, v in price.items())
    return s


async def setup(gateway, fake_upstream, protocol, upstream_model="real-model-1"):
    fake = await fake_upstream(protocol)
    gw = await gateway(fake.toml("up") + model_toml("m1", "up", upstream_model))
    return gw, fake


def assert_clean_upstream(fake, gw, auth_header, upstream_model="real-model-1"):
    assert fake.log, "upstream received nothing"
    for req in fake.log:
        hdrs = req["headers"]
        joined = " ".join(f"{k}={v}" for k, v in hdrs.items())
        assert gw.key not in joined, "client key forwarded upstream"
        assert UPSTREAM_SECRET in hdrs.get(auth_header, ""), hdrs
        assert "cookie" not in hdrs


async def test_openai_chat_relay(gateway, fake_upstream):
    gw, fake = await setup(gateway, fake_upstream, "openai-chat")
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    r = await client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "The answer is 42."
    assert r.usage.prompt_tokens == 15 and r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens_details.cached_tokens == 5
    assert fake.log[-1]["body"]["model"] == "real-model-1"
    assert fake.log[-1]["path"] == "/v1/chat/completions"
    # streamed: the client did not ask for usage, so it sees none, but it is billed
    stream = await client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}], stream=True)
    text, usage_chunks = "", 0
    async for chunk in stream:
        if chunk.usage is not None:
            usage_chunks += 1
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == "The answer is 42." and usage_chunks == 0
    assert fake.log[-1]["body"]["stream_options"] == {"include_usage": True}
    assert_clean_upstream(fake, gw, "authorization")
    await gw.idle()
    recs = await gw.storage.list_usage()
    assert len(recs) == 2, recs
    assert all(r.input_tokens == 10 and r.cache_read_tokens == 5 and r.output_tokens == 7 for r in recs), [(r.input_tokens, r.cache_read_tokens, r.output_tokens, r.streamed, r.usage_source) for r in recs]
    assert recs[0].cost == recs[1].cost > 0


async def test_anthropic_relay_forwards_version_and_beta(gateway, fake_upstream):
    gw, fake = await setup(gateway, fake_upstream, "anthropic-messages")
    client = anthropic.AsyncAnthropic(base_url=gw.url, api_key=gw.key, max_retries=0,
                                      default_headers={"anthropic-beta": "interleaved-thinking-2025-05-14", "cookie": "a=b"})
    msg = await client.messages.create(model="m1", max_tokens=100, messages=[{"role": "user", "content": "hello"}])
    assert msg.content[0].text == "The answer is 42."
    assert msg.usage.input_tokens == 10 and msg.usage.cache_read_input_tokens == 5 and msg.usage.cache_creation_input_tokens == 2
    req = fake.log[-1]
    assert req["body"]["model"] == "real-model-1"
    assert req["headers"]["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    assert req["headers"]["anthropic-version"]
    async with client.messages.stream(model="m1", max_tokens=100, messages=[{"role": "user", "content": "[tool] go"}],
                                      tools=[{"name": "get_weather", "input_schema": {"type": "object"}}]) as s:
        final = await s.get_final_message()
    assert final.stop_reason == "tool_use"
    tool = [b for b in final.content if b.type == "tool_use"][0]
    assert tool.name == "get_weather" and tool.input == {"city": "Paris"}
    assert_clean_upstream(fake, gw, "x-api-key")


async def test_anthropic_query_string_is_ignored_by_routing(gateway, fake_upstream):
    import aiohttp

    gw, fake = await setup(gateway, fake_upstream, "anthropic-messages")
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/messages?beta=true", headers={"x-api-key": gw.key, "anthropic-version": "2023-06-01"},
                          json={"model": "m1", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.status == 200
            assert (await r.json())["content"][0]["text"] == "The answer is 42."
        async with s.post(gw.url + "/v1/messages/count_tokens?beta=true", headers={"x-api-key": gw.key},
                          json={"model": "m1", "messages": [{"role": "user", "content": "count me"}]}) as r:
            assert r.status == 200
            assert isinstance((await r.json())["input_tokens"], int)


@pytest.mark.parametrize("api_version", ["v1beta", "v1"])
async def test_gemini_relay(gateway, fake_upstream, api_version):
    gw, fake = await setup(gateway, fake_upstream, "gemini")
    client = genai.Client(api_key=gw.key, http_options=gtypes.HttpOptions(base_url=gw.url, api_version=api_version))
    r = await client.aio.models.generate_content(model="m1", contents="hello")
    assert r.text == "The answer is 42."
    assert r.usage_metadata.prompt_token_count == 15 and r.usage_metadata.candidates_token_count == 7
    assert "real-model-1" in fake.log[-1]["path"]
    chunks = []
    async for c in await client.aio.models.generate_content_stream(model="m1", contents="hello"):
        chunks.append(c.text or "")
    assert "".join(chunks) == "The answer is 42."
    assert fake.log[-1]["query"].get("alt") == "sse"
    assert_clean_upstream(fake, gw, "x-goog-api-key")


async def test_gemini_key_in_query_string(gateway, fake_upstream):
    import aiohttp

    gw, fake = await setup(gateway, fake_upstream, "gemini")
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + f"/v1beta/models/m1:generateContent?key={gw.key}",
                          json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}) as r:
            assert r.status == 200, await r.text()
    assert gw.key not in str(fake.log[-1]["query"]) and gw.key not in fake.log[-1]["path"]


async def test_responses_relay(gateway, fake_upstream):
    gw, fake = await setup(gateway, fake_upstream, "openai-responses")
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    r = await client.responses.create(model="m1", input="hello")
    assert r.output_text == "The answer is 42."
    assert r.usage.input_tokens == 15 and r.usage.output_tokens == 7
    events = []
    async with client.responses.stream(model="m1", input="hello") as s:
        async for ev in s:
            events.append(ev.type)
        final = await s.get_final_response()
    assert final.output_text == "The answer is 42." and events[-1] == "response.completed"
    assert fake.log[-1]["body"]["model"] == "real-model-1"
    assert_clean_upstream(fake, gw, "authorization")


async def test_responses_stream_ends_with_the_terminal_event_while_the_upstream_lingers(gateway, fake_upstream):
    """An upstream that sends [DONE] with response.completed and keeps its body
    open: the client's stream ends with the terminal event at once, the
    [DONE] never reaches it, and the upstream's usage is charged."""
    fake = await fake_upstream("openai-responses")
    gw = await gateway(fake.toml("up") + model_toml("m1", "up", "real-model-1") + "[server]\ndrain_seconds = 0.3\n")
    body = {"model": "m1", "input": "hello [linger]", "stream": True}

    async def ask():
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {gw.key}"}) as r:
                return r.status, await r.read()

    status, raw = await asyncio.wait_for(ask(), 5)
    assert status == 200 and b"[DONE]" not in raw
    assert raw.endswith(b"\n\n") and raw.rstrip().rsplit(b"\n", 2)[-2] == b"event: response.completed"
    await gw.idle()
    [rec] = await gw.storage.list_usage()
    assert rec.status == "ok" and rec.usage_source == "upstream" and (rec.input_tokens, rec.output_tokens) == (10, 7)


@pytest.mark.parametrize("tag", ["burst", "padded"])
async def test_translated_burst_goes_as_text_runs_and_arrives_whole(gateway, fake_upstream, monkeypatch, tag):
    """An OpenAI-Chat upstream that sends a 40-delta answer in one write, to
    an Anthropic client: the relay takes the text frames as TextRuns (built
    by joining bytes), and the client still gets every delta as its own
    event, the exact text, the upstream's usage, and the charge.  Also when
    every chunk is padded as OpenAI does by default (``[padded]``: a last
    "obfuscation" member, new in each; the decoder reads past it)."""
    from cheapproxy_anthropic.stream import MessagesStreamEncoder
    from cheapproxy.testing.fake_openai_chat import BURST_WORDS

    runs: list[int] = []
    plain = MessagesStreamEncoder.encode_text_run

    def counted(self, run):  # the encoder's own method, counted
        runs.append(len(run.texts))
        return plain(self, run)

    monkeypatch.setattr(MessagesStreamEncoder, "encode_text_run", counted)
    gw, fake = await setup(gateway, fake_upstream, "openai-chat")
    client = anthropic.AsyncAnthropic(base_url=gw.url, api_key=gw.key, max_retries=0)
    deltas = []
    async with client.messages.stream(model="m1", max_tokens=100, messages=[{"role": "user", "content": f"[{tag}] go"}]) as s:
        async for ev in s:
            if ev.type == "content_block_delta":
                deltas.append(ev.delta.text)
        final = await s.get_final_message()
    assert deltas == BURST_WORDS and final.content[0].text == "".join(BURST_WORDS)
    assert runs and sum(runs) >= 16, runs  # the burst went as runs (the first deltas may not)
    assert "include_obfuscation" not in fake.log[-1]["body"]["stream_options"]  # the upstream's default: padded
    assert (final.usage.input_tokens, final.usage.output_tokens) == (10, 7)
    await gw.idle()
    [rec] = await gw.storage.list_usage()
    assert rec.status == "ok" and rec.usage_source == "upstream" and rec.output_tokens == 7 and rec.cost > 0


async def test_embeddings_relay(gateway, fake_upstream):
    fake = await fake_upstream("openai-chat")
    gw = await gateway(fake.toml("up") + model_toml("emb", "up", "text-embedding-3-small", input=0.02).replace(
        'upstream = "up"\n', 'upstream = "up"\nkind = "embedding"\n'))
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    r = await client.embeddings.create(model="emb", input=["a", "b"])
    assert len(r.data) == 2 and len(r.data[0].embedding) > 0
    assert fake.log[-1]["path"] == "/v1/embeddings" and fake.log[-1]["body"]["model"] == "text-embedding-3-small"


async def test_demo_model_on_every_protocol(gateway):
    gw = await gateway("")
    oa = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    r = await oa.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hello world"}])
    assert r.choices[0].message.content == "echo: hello world"
    s = await oa.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hello world"}], stream=True,
                                         stream_options={"include_usage": True})
    text, usage = "", None
    async for c in s:
        if c.choices:
            text += c.choices[0].delta.content or ""
        if c.usage:
            usage = c.usage
    assert text == "echo: hello world" and usage.completion_tokens > 0
    rr = await oa.responses.create(model="demo", input="ping")
    assert rr.output_text == "echo: ping"
    an = anthropic.AsyncAnthropic(base_url=gw.url, api_key=gw.key, max_retries=0)
    m = await an.messages.create(model="demo", max_tokens=50, messages=[{"role": "user", "content": "yo"}])
    assert m.content[0].text == "echo: yo"
    g = genai.Client(api_key=gw.key, http_options=gtypes.HttpOptions(base_url=gw.url, api_version="v1beta"))
    gr = await g.aio.models.generate_content(model="demo", contents="gem")
    assert gr.text == "echo: gem"
    e = await oa.embeddings.create(model="demo-embed", input="x")
    assert len(e.data[0].embedding) == 8
