"""(f) same-protocol relay: model replaced, the rest equal, usage read from
streamed and non-streamed bodies, completion and in-stream errors noticed."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession
from hypothesis import given, settings
from hypothesis import strategies as st

from cheapproxy import ir
from cheapproxy.protocol import Inbound
from cheapproxy.sse import SSEParser
from cheapproxy.testing.fake_anthropic import make_app
from cheapproxy.testing.taps import relayed

from anthropic_testlib import CLAUDE_CODE_BODY, CODEC, golden, split

BETA = "claude-code-20250219,interleaved-thinking-2025-05-14,mid-conversation-system-2026-04-07"


def inbound(body: dict[str, Any], *, operation: str = "chat", headers: dict[str, str] | None = None,
            query: dict[str, str] | None = None) -> Inbound:
    return Inbound(model=body["model"], stream=bool(body.get("stream")) and operation == "chat", operation=operation,
                   body=body, headers=headers or {}, query=query or {})


def relay(body: bytes, chunks: list[bytes], *, stream: bool = True) -> tuple[Any, bytes]:
    pt = CODEC.passthrough(inbound({"model": "m", "stream": stream}), stream=stream)
    return pt, relayed(pt, chunks)


def test_request_replaces_only_the_model() -> None:
    original = copy.deepcopy(CLAUDE_CODE_BODY)
    up = CODEC.passthrough_request(inbound(CLAUDE_CODE_BODY, headers={
        "anthropic-version": "2026-10-21", "anthropic-beta": BETA}, query={"beta": "true", "key": "sk-user"}),
        "claude-opus-4-8-20260501")
    sent = orjson.loads(up.body)
    assert sent.pop("model") == "claude-opus-4-8-20260501"
    original.pop("model")
    assert sent == original  # system roles, thinking signatures, cache_control, context_management untouched
    assert CLAUDE_CODE_BODY["model"] == "claude-opus-4-8"  # the inbound body is not mutated
    assert up.path == "/v1/messages" and up.stream is True
    assert up.headers["anthropic-version"] == "2026-10-21" and up.headers["anthropic-beta"] == BETA
    assert up.query == {"beta": "true"}  # never the client's ?key=
    assert "x-api-key" not in up.headers and "authorization" not in up.headers


def test_request_defaults_and_count_tokens_path() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    up = CODEC.passthrough_request(inbound(body, operation="count_tokens"), "claude-haiku-4-5")
    assert up.path == "/v1/messages/count_tokens" and up.stream is False and up.query == {}
    assert up.headers == {"anthropic-version": "2023-06-01", "content-type": "application/json"}


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("cut", [None, 5, -9, -2])
def test_bytes_after_message_stop_never_reach_the_client(cut: int | None, newline: bytes) -> None:
    """An upstream that writes more after message_stop in the same read: the
    client gets the stream up to that frame and not a byte after it, and a
    message_delta after it is not read (in LF, CRLF and CR framing)."""
    body = golden("thinking_text_tool.sse")
    assert body.endswith(b"message_stop\"}\n\n")
    junk = _sse("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 999}}) + b"data: junk\n\n"
    body, junk = body.replace(b"\n", newline), junk.replace(b"\n", newline)
    whole = body + junk
    pieces = [whole] if cut is None else [whole[:cut], whole[cut:]] if cut > 0 else [whole[: len(body) + cut], whole[len(body) + cut :]]
    pt, out = relay(whole, pieces)
    assert out == body
    assert pt.ended and pt.usage == ir.Usage(input_tokens=25, output_tokens=89, cache_read_tokens=2048, cache_write_tokens=1200)


def test_stream_usage_completion_and_bytes() -> None:
    body = golden("thinking_text_tool.sse")
    pt, out = relay(body, [body])
    assert out == body
    assert pt.usage == ir.Usage(input_tokens=25, output_tokens=89, cache_read_tokens=2048, cache_write_tokens=1200)
    assert pt.complete and pt.output_seen and pt.error_message is None


def test_stream_usage_with_input_in_message_delta() -> None:
    pt, _ = relay(golden("server_tool_stop_sequence.sse"), [golden("server_tool_stop_sequence.sse")])
    assert pt.usage == ir.Usage(input_tokens=2679, output_tokens=57) and pt.complete


def test_output_seen_only_after_content() -> None:
    body = golden("thinking_text_tool.sse")
    first = body[: body.index(b"event: content_block_start")]
    pt = CODEC.passthrough(inbound({"model": "m", "stream": True}), stream=True)
    assert pt.feed(first) == first
    assert not pt.output_seen and pt.usage is not None and pt.usage.output_tokens == 1 and not pt.complete
    pt.feed(body[len(first):])
    assert pt.output_seen and pt.complete


def test_in_stream_error_is_noticed() -> None:
    pt, out = relay(golden("overloaded_midstream.sse"), [golden("overloaded_midstream.sse")])
    assert pt.error_message == "Overloaded" and not pt.complete and pt.output_seen
    assert out == golden("overloaded_midstream.sse")


def test_cut_stream_is_incomplete_but_billed_for_what_went_by() -> None:
    body = golden("thinking_text_tool.sse")
    cut = body[: body.index(b"event: message_delta")]
    pt, _ = relay(cut, [cut])
    assert not pt.complete and pt.output_seen
    assert pt.usage == ir.Usage(input_tokens=25, output_tokens=1, cache_read_tokens=2048, cache_write_tokens=1200)


def test_text_mentioning_event_names_does_not_confuse_the_scan() -> None:
    tricky = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
              b'"text":"event: message_stop and an error"}}\n\n')
    body = golden("redacted_thinking.sse")
    at = body.index(b"event: message_delta")
    pt, _ = relay(body[:at] + tricky, [body[:at] + tricky])
    assert not pt.complete and pt.error_message is None


@settings(max_examples=120, deadline=None)
@given(name=st.sampled_from(["thinking_text_tool.sse", "server_tool_stop_sequence.sse", "overloaded_midstream.sse",
                             "redacted_thinking.sse"]),
       cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=40), crlf=st.booleans())
def test_any_chunking_same_bookkeeping(name: str, cuts: list[int], crlf: bool) -> None:
    body = golden(name)
    if crlf:
        body = body.replace(b"\n", b"\r\n")
    whole, out_whole = relay(body, [body])
    parts, out_parts = relay(body, split(body, cuts))
    assert out_whole == out_parts == body
    assert (parts.usage, parts.complete, parts.output_seen, parts.error_message) == (
        whole.usage, whole.complete, whole.output_seen, whole.error_message)
    assert whole.usage is not None


def test_non_stream_body() -> None:
    body = orjson.dumps({"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                         "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
                         "usage": {"input_tokens": 3, "cache_creation_input_tokens": 4, "cache_read_input_tokens": 5,
                                   "output_tokens": 6}})
    want = ir.Usage(input_tokens=3, output_tokens=6, cache_read_tokens=5, cache_write_tokens=4)
    assert CODEC.usage_from_body(body) == want
    pt, out = relay(body, [body[:10], body[10:]], stream=False)
    assert out == body and pt.usage == want and pt.complete and pt.output_seen
    assert CODEC.usage_from_body(b'{"input_tokens": 12}') is None
    assert CODEC.usage_from_body(b"not json") is None


async def test_relay_through_the_fake(aiohttp_server: Any) -> None:
    """Claude Code's body with its beta header relays as-is; dropping the header
    gets the real API's 400 (clients.md)."""
    log: list[dict[str, Any]] = []
    server = await aiohttp_server(make_app(log))
    body = copy.deepcopy(CLAUDE_CODE_BODY)
    body["messages"].append({"role": "assistant", "content": [{"type": "text", "text": "ok"}]})
    body["messages"].append({"role": "user", "content": "[think] again"})
    for beta, status in ((BETA, 200), (None, 400)):
        headers = {"anthropic-version": "2023-06-01", **({"anthropic-beta": beta} if beta else {})}
        up = CODEC.passthrough_request(inbound(body, headers=headers, query={"beta": "true"}), "claude-opus-4-8")
        pt = CODEC.passthrough(inbound(body), stream=True)
        async with ClientSession() as s:
            async with s.post(server.make_url(up.path), params=up.query, data=up.body,
                              headers={**up.headers, "x-api-key": "upstream-secret"}) as r:
                assert r.status == status
                if status != 200:
                    assert "role" in CODEC.decode_error(r.status, await r.read())
                    continue
                relayed = b"".join([pt.feed(c) async for c in r.content.iter_any()]) + pt.close()
        assert pt.complete and pt.output_seen
        assert pt.usage == ir.Usage(input_tokens=10, output_tokens=7, cache_read_tokens=5, cache_write_tokens=2,
                                    reasoning_tokens=3)
        answer = ir.collect(CODEC.stream_decoder().feed(relayed))
        assert answer.content[0].signature == "sig-anthropic" and answer.content[1].text == "The answer is 42."
    assert log[0]["query"] == {"beta": "true"} and log[0]["headers"]["anthropic-beta"] == BETA
    assert log[0]["body"]["messages"][1]["role"] == "system"


# ---- the byte-level tap against a reference that parses every frame

_TEXT = st.sampled_from(["", "Sure", "error", "message_stop", "event: error", "message_delta \u00e9"])


def _sse(event: str, obj: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _afr(kind: str, text: str, n: int) -> bytes:
    if kind == "start":
        return _sse("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "m",
            "usage": {"input_tokens": n, "output_tokens": 1}}})
    if kind == "delta":
        return _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": text}})
    if kind == "mdelta":
        return _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                      "usage": {"output_tokens": n}})
    if kind == "error":
        return _sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": f"busy {n}"}})
    return _sse("message_stop", {"type": "message_stop"})


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.tuples(st.sampled_from(["start", "delta", "delta", "delta", "mdelta", "error", "stop"]),
                                 _TEXT, st.integers(min_value=0, max_value=99)), min_size=1, max_size=25),
       cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=8))
def test_tap_agrees_with_a_full_parse_of_every_frame(frames: list[tuple[str, str, int]], cuts: list[int]) -> None:
    """Usage, completion and errors read with byte searches equal what
    parsing every frame says, however the stream is split; event names or
    'error' inside text never count.  Bytes pass untouched up to the end of
    the first message_stop (after an error event, to the end of the body)."""
    raw = [_afr(k, t, n) for k, t, n in frames]
    body = b"".join(raw)
    upto = 0
    for (kind, _, _), f in zip(frames, raw):
        if kind == "error":
            upto = len(body)
            break
        upto += len(f)
        if kind == "stop":
            break
    pieces = split(body, cuts)
    ref = CODEC.passthrough(inbound({"model": "m", "stream": True}), stream=True)
    ref._parser = SSEParser()  # the general path: every frame parsed (the same reads: both stop reading after an error)
    assert relayed(ref, pieces) == body[:upto]
    pt, out = relay(body, pieces)
    assert out == body[:upto]
    assert (pt.usage, pt.complete, pt.error_message) == (ref.usage, ref.complete, ref.error_message)
