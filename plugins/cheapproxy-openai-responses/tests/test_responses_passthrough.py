"""Same-protocol relay: the body goes as-is except the model; the tap reads
usage, completion and errors without changing a byte."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cheapproxy import ir
from cheapproxy.protocol import Inbound
from cheapproxy.testing.fake_openai_responses import make_app
from cheapproxy.testing.taps import relayed

from responses_testlib import PROTO, codex_body, fixture


def inbound(body: dict[str, Any]) -> Inbound:
    return Inbound(model=body["model"], stream=bool(body.get("stream")), operation="chat", body=body)


def tap_all(chunks: list[bytes], *, stream: bool = True) -> tuple[Any, bytes]:
    tap = PROTO.passthrough(inbound({"model": "m", "stream": stream}), stream=stream)
    return tap, relayed(tap, chunks)


def test_request_body_only_model_replaced() -> None:
    body = codex_body()
    ureq = PROTO.passthrough_request(inbound(body), "gpt-5-codex-upstream")
    assert ureq.path == "/responses" and ureq.stream is True
    sent = orjson.loads(ureq.body)
    assert sent.pop("model") == "gpt-5-codex-upstream"
    original = dict(body)
    original.pop("model")
    # hosted tools, namespaces, ids, include, client_metadata... all kept
    assert sent == original


@pytest.mark.parametrize(("name", "usage"), [
    ("text.sse", ir.Usage(input_tokens=138, cache_read_tokens=1152, output_tokens=18)),
    ("tool_call.sse", ir.Usage(input_tokens=457, cache_read_tokens=4864, output_tokens=212, reasoning_tokens=128)),
    ("parallel_done.sse", ir.Usage(input_tokens=310, output_tokens=48)),
    ("incomplete.sse", ir.Usage(input_tokens=20, output_tokens=64, reasoning_tokens=56)),
])
def test_stream_tap_reads_usage_and_completion(name: str, usage: ir.Usage) -> None:
    body = fixture(name)
    tap, out = tap_all([body])
    # the client's stream ends with the terminal event: an upstream's trailing
    # [DONE] (parallel_done.sse) is not part of a Responses stream
    assert out == body.removesuffix(b"data: [DONE]\n\n")
    assert tap.usage == usage and tap.complete is True and tap.output_seen is True and tap.error_message is None


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(["text.sse", "tool_call.sse", "custom_tool.sse", "failed.sse", "error_event.sse"]),
       cuts=st.lists(st.integers(min_value=0, max_value=6000), max_size=30))
def test_stream_tap_is_chunking_independent(name: str, cuts: list[int]) -> None:
    body = fixture(name)
    points = sorted({c % (len(body) + 1) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0] + points, points + [len(body)])]
    tap, out = tap_all(chunks)
    whole, _ = tap_all([body])
    assert out == body
    assert (tap.usage, tap.complete, tap.output_seen, tap.error_message) == (
        whole.usage, whole.complete, whole.output_seen, whole.error_message)


@pytest.mark.parametrize("cut", [None, 7, -5])
@pytest.mark.parametrize("crlf", [False, True])
def test_bytes_after_the_terminal_event_never_reach_the_client(cut: int | None, crlf: bool) -> None:
    """An upstream that writes more after response.completed (here a stray
    event with usage, and [DONE]) in the same read: the tap ends the stream
    with the terminal frame, and nothing after it is sent or read."""
    body = fixture("text.sse")
    junk = (b'event: response.completed\ndata: {"type":"response.completed","response":{"usage":'
            b'{"input_tokens":999,"output_tokens":999}}}\n\ndata: [DONE]\n\n')
    if crlf:
        body, junk = body.replace(b"\n", b"\r\n"), junk.replace(b"\n", b"\r\n")
    whole = body + junk
    pieces = [whole] if cut is None else [whole[:cut], whole[cut:]] if cut > 0 else [whole[: len(body) + cut], whole[len(body) + cut :]]
    tap, out = tap_all(pieces)
    assert tap.ended and tap.complete
    assert out == body
    assert tap.usage == ir.Usage(input_tokens=138, cache_read_tokens=1152, output_tokens=18)


def test_an_error_event_does_not_end_the_relay() -> None:
    """An ``error`` event stops the reading but not the relay: what follows
    (a response.failed, say) still reaches the client."""
    body = fixture("error_event.sse")
    tap, out = tap_all([body])
    assert out == body and not tap.ended and tap.error_message


def test_stream_tap_without_event_lines() -> None:
    """Some Responses-compatible servers send only data lines."""
    for name, complete, error in [("tool_call.sse", True, None), ("failed.sse", True, "The model produced invalid content.")]:
        body = b"\n".join(line for line in fixture(name).split(b"\n") if not line.startswith(b"event:"))
        tap, out = tap_all([body[:100], body[100:]])
        whole, _ = tap_all([fixture(name)])
        assert out == body
        assert (tap.complete, tap.error_message, tap.usage, tap.output_seen) == (complete, error, whole.usage, True)


def test_stream_tap_failed_and_error_events() -> None:
    # terminal failure events end the stream (complete) and say it failed (error_message)
    tap, _ = tap_all([fixture("failed.sse")])
    assert tap.complete is True and tap.output_seen is True
    assert tap.error_message == "The model produced invalid content."
    tap, _ = tap_all([fixture("error_event.sse")])
    assert tap.complete is True and tap.output_seen is False
    assert tap.error_message.startswith("Rate limit reached for gpt-4o")


def test_stream_tap_cut_body_is_not_complete() -> None:
    body = fixture("text.sse")
    cut = body[: body.index(b"event: response.completed")]
    tap, out = tap_all([cut])
    assert out == cut and tap.complete is False and tap.usage is None and tap.output_seen is True


def test_stream_tap_ignores_text_that_mentions_event_names() -> None:
    delta = orjson.dumps({"type": "response.output_text.delta", "sequence_number": 2, "item_id": "m", "output_index": 0,
                          "content_index": 0, "delta": 'say "response.completed" and error'})
    body = (b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\"}}\n\n"
            b"event: response.output_text.delta\ndata: " + delta + b"\n\n")
    tap, _ = tap_all([body])
    assert tap.complete is False and tap.error_message is None and tap.usage is None


def test_non_stream_usage_from_body() -> None:
    body = orjson.dumps({"id": "resp_1", "status": "completed", "output": [{"type": "message"}], "usage": {
        "input_tokens": 15, "input_tokens_details": {"cached_tokens": 5, "cache_write_tokens": 2},
        "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 3}, "total_tokens": 22}})
    expected = ir.Usage(input_tokens=8, cache_read_tokens=5, cache_write_tokens=2, output_tokens=7, reasoning_tokens=3)
    assert PROTO.usage_from_body(body) == expected
    tap, out = tap_all([body[:10], body[10:]], stream=False)
    assert out == body and tap.usage == expected and tap.complete is True and tap.output_seen is True
    assert PROTO.usage_from_body(b"not json") is None


async def test_relay_against_the_fake(aiohttp_server: Any) -> None:
    log: list[dict[str, Any]] = []
    server = await aiohttp_server(make_app(log))
    body = {"model": "client-name", "input": "hello [tool]", "stream": True, "store": False,
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}},
                      {"type": "web_search"}],
            "prompt_cache_key": "k1"}
    ureq = PROTO.passthrough_request(inbound(body), "gpt-up")
    tap = PROTO.passthrough(inbound(body), stream=True)
    relayed = b""
    async with aiohttp.ClientSession() as s:
        async with s.post(str(server.make_url("/v1")) + ureq.path, data=ureq.body,
                          headers={"Authorization": "Bearer upstream-secret"}) as r:
            async for chunk in r.content.iter_chunked(13):
                relayed += tap.feed(chunk)
    relayed += tap.close()
    assert log[-1]["body"] == dict(body, model="gpt-up")
    assert tap.complete and tap.output_seen and tap.error_message is None
    assert tap.usage == ir.Usage(input_tokens=10, cache_read_tokens=5, output_tokens=7)
    # what the client gets is still a valid Responses stream with the tool call
    resp = ir.collect(PROTO.stream_decoder().feed(relayed))
    assert resp.content[0].name == "get_weather" and resp.content[0].arguments == '{"city": "Paris"}'
