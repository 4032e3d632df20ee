"""Same-protocol relay: the body goes upstream as-is except the model, the
answer comes back byte for byte, usage and completion are read on the way."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cheapproxy_gemini.passthrough as pt_module
from cheapproxy import ir
from cheapproxy.protocol import Inbound
from cheapproxy_gemini.codec import GeminiProtocol
from gemini_helpers import fixture_bytes, make_provider, split

P = GeminiProtocol()
USAGE = ir.Usage(input_tokens=10, cache_read_tokens=5, output_tokens=7)

CLIENT_BODY = {
    "contents": [{"role": "user", "parts": [{"text": "hello"}]}],
    "systemInstruction": {"parts": [{"text": "sys"}]},
    "generationConfig": {"temperature": 0.2, "thinkingConfig": {"thinking_budget": 128}, "speechConfig": None},
    "safetySettings": [{"category": "HARM_CATEGORY_HATE_SPEECH", "threshold": "BLOCK_NONE"}],
    "someFutureField": {"kept": True},
}


def inbound(body: dict[str, Any], *, stream: bool, query: dict[str, str] | None = None, op: str = "chat") -> Inbound:
    return Inbound(model="my-gemini", stream=stream, operation=op, body=body, query=query or {})


def test_passthrough_request_replaces_only_the_model() -> None:
    ureq = P.passthrough_request(inbound(CLIENT_BODY, stream=False, query={"key": "client-secret"}), "gemini-2.5-pro")
    assert ureq.path == "/v1beta/models/gemini-2.5-pro:generateContent"
    assert ureq.query == {}  # the client's ?key= never goes upstream
    assert orjson.loads(ureq.body) == CLIENT_BODY  # unknown fields and snake_case survive
    assert b"client-secret" not in ureq.body and ureq.stream is False

    s = P.passthrough_request(inbound(CLIENT_BODY, stream=True, query={"alt": "sse", "key": "client-secret"}), "models/gemini-2.5-pro")
    assert (s.path, s.query, s.stream) == ("/v1beta/models/gemini-2.5-pro:streamGenerateContent", {"alt": "sse"}, True)
    arr = P.passthrough_request(inbound(CLIENT_BODY, stream=True), "gemini-2.5-pro")
    assert arr.query == {}  # the client asked for the JSON array form: relay that form


def test_count_tokens_passthrough_rewrites_the_inner_model() -> None:
    body = {"generateContentRequest": {"model": "models/my-gemini", "contents": [{"parts": [{"text": "a"}]}]}}
    ureq = P.passthrough_request(inbound(body, stream=False, op="count_tokens"), "gemini-2.5-flash")
    assert ureq.path == "/v1beta/models/gemini-2.5-flash:countTokens"
    assert orjson.loads(ureq.body) == {"generateContentRequest": {"model": "models/gemini-2.5-flash",
                                                                  "contents": [{"parts": [{"text": "a"}]}]}}
    assert body["generateContentRequest"]["model"] == "models/my-gemini"  # the inbound body is not mutated
    plain = {"contents": [{"parts": [{"text": "a"}]}]}
    assert orjson.loads(P.passthrough_request(inbound(plain, stream=False, op="count_tokens"), "g").body) == plain


async def relay(fake: Any, text: str, *, stream: bool, sse: bool) -> tuple[bytes, bytes, Any]:
    """Send a passthrough request to the fake; return (received bytes, bytes
    forwarded to the client, the Passthrough)."""
    body = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    inb = inbound(body, stream=stream, query={"alt": "sse"} if sse else {})
    ureq = P.passthrough_request(inb, "gemini-2.5-flash")
    provider = make_provider(str(fake.make_url("")))
    relay_obj = P.passthrough(inb, stream=stream)
    received, forwarded = b"", b""
    async with aiohttp.ClientSession() as session:
        async with session.post(provider.url(ureq.path), params=ureq.query, data=ureq.body,
                                headers={**provider.auth_headers(), "content-type": "application/json"}) as resp:
            assert resp.status == 200
            try:
                async for chunk in resp.content.iter_any():
                    received += chunk
                    forwarded += relay_obj.feed(chunk)
            except aiohttp.ClientPayloadError:
                pass
    forwarded += relay_obj.close()
    assert fake.log[-1]["body"] == body
    return received, forwarded, relay_obj


@pytest.mark.parametrize("sse", [True, False])
@pytest.mark.parametrize("text,usage", [
    ("hello", USAGE),
    ("[think]", ir.Usage(input_tokens=10, cache_read_tokens=5, output_tokens=7, reasoning_tokens=3)),
    ("[parallel]", USAGE),
])
async def test_stream_relay(fake: Any, sse: bool, text: str, usage: ir.Usage) -> None:
    received, forwarded, relay_obj = await relay(fake, text, stream=True, sse=sse)
    assert forwarded == received  # byte-exact
    assert received.startswith(b"data: " if sse else b"[")
    assert relay_obj.usage == usage
    assert relay_obj.complete and relay_obj.output_seen and relay_obj.error_message is None


async def test_cut_stream_relay_is_incomplete(fake: Any) -> None:
    received, forwarded, relay_obj = await relay(fake, "[cut]", stream=True, sse=True)
    assert forwarded == received and received.count(b"data: ") == 1
    assert relay_obj.complete is False and relay_obj.output_seen is True
    # billing uses what streamed: the cumulative usage of the last chunk seen
    assert relay_obj.usage == ir.Usage(input_tokens=10, cache_read_tokens=5, output_tokens=2)


async def test_non_stream_relay(fake: Any) -> None:
    received, forwarded, relay_obj = await relay(fake, "[tool]", stream=False, sse=False)
    assert forwarded == received
    assert relay_obj.usage == USAGE and relay_obj.complete and relay_obj.output_seen
    assert P.usage_from_body(received) == USAGE


def test_usage_from_bodies() -> None:
    assert P.usage_from_body(fixture_bytes("array_stream.json")) == ir.Usage(input_tokens=4, output_tokens=6)
    assert P.usage_from_body(b'{"candidates": []}') is None
    assert P.usage_from_body(b"not json") is None
    body = b'{"usageMetadata": {"promptTokenCount": 100, "cachedContentTokenCount": 40, "candidatesTokenCount": 9, "thoughtsTokenCount": 20, "toolUsePromptTokenCount": 3}}'
    assert P.usage_from_body(body) == ir.Usage(input_tokens=63, cache_read_tokens=40, output_tokens=29, reasoning_tokens=20)


def test_in_stream_error_is_reported() -> None:
    relay_obj = P.passthrough(inbound({}, stream=True, query={"alt": "sse"}), stream=True)
    body = fixture_bytes("error_midstream.sse")
    assert relay_obj.feed(body) == body
    relay_obj.close()
    assert relay_obj.error_message == "UNAVAILABLE: The model is overloaded. Please try again later."
    assert relay_obj.complete is False
    assert relay_obj.usage == ir.Usage(input_tokens=5, output_tokens=1)


def test_usage_json_is_parsed_once_not_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = orjson.loads

    def counting(data: Any) -> Any:
        calls.append(data)
        return real(data)

    monkeypatch.setattr(pt_module.orjson, "loads", counting)
    relay_obj = P.passthrough(inbound({}, stream=True, query={"alt": "sse"}), stream=True)
    body = fixture_bytes("thinking_parallel_tools.sse")
    for piece in split(body, list(range(0, len(body), 97))):
        relay_obj.feed(piece)
    relay_obj.close()
    assert calls == []  # five usage-bearing frames went by, none parsed yet
    assert relay_obj.usage == ir.Usage(input_tokens=112, cache_read_tokens=128, output_tokens=121, reasoning_tokens=80)
    assert len(calls) == 1 and relay_obj.complete


FIXTURES = ["text.sse", "thinking_parallel_tools.sse", "gemini3_text_signature.sse", "blocked_prompt.sse",
            "max_tokens.sse", "error_midstream.sse", "cut.sse", "array_stream.json"]


def _run(name: str, pieces: list[bytes]) -> tuple[bytes, Any, bool, bool, str | None]:
    sse = not name.endswith(".json")
    relay_obj = P.passthrough(inbound({}, stream=True, query={"alt": "sse"} if sse else {}), stream=True)
    out = b"".join(relay_obj.feed(p) for p in pieces) + relay_obj.close()
    return out, relay_obj.usage, relay_obj.complete, relay_obj.output_seen, relay_obj.error_message


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(FIXTURES), cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=30))
def test_relay_is_chunking_independent(name: str, cuts: list[int]) -> None:
    body = fixture_bytes(name)
    whole = _run(name, [body])
    assert whole[0] == body
    assert _run(name, split(body, cuts)) == whole


@pytest.mark.parametrize("name,usage,complete", [
    ("text.sse", ir.Usage(input_tokens=12, output_tokens=27), True),
    ("blocked_prompt.sse", ir.Usage(input_tokens=31), True),
    ("cut.sse", ir.Usage(input_tokens=12, output_tokens=15), False),
    ("array_stream.json", ir.Usage(input_tokens=4, output_tokens=6), True),
])
def test_relay_reads_golden_streams(name: str, usage: ir.Usage, complete: bool) -> None:
    _, got_usage, got_complete, _, err = _run(name, [fixture_bytes(name)])
    assert (got_usage, got_complete, err) == (usage, complete, None)


@pytest.mark.parametrize("name", ["text.sse", "array_stream.json"])
def test_state_is_known_frame_by_frame_before_close(name: str) -> None:
    """The dispatcher reads usage / output_seen / complete while the stream is
    still running (client drops, fallback decisions), not only at close()."""
    sse = name.endswith(".sse")
    relay_obj = P.passthrough(inbound({}, stream=True, query={"alt": "sse"} if sse else {}), stream=True)
    body = fixture_bytes(name)
    assert relay_obj.usage is None and not relay_obj.output_seen
    if sse:
        frames = [f + b"\r\n\r\n" for f in body.split(b"\r\n\r\n") if f]
    else:
        cut = body.index(b"\n,\r\n") + 1
        frames = [body[:cut], body[cut:]]
    seen = []
    for frame in frames:
        relay_obj.feed(frame)
        seen.append((relay_obj.output_seen, relay_obj.complete, relay_obj.usage.output_tokens if relay_obj.usage else None))
    if sse:
        assert seen == [(True, False, 4), (True, False, 15), (True, True, 27)]
    else:
        assert seen == [(True, False, 1), (True, True, 6)]
