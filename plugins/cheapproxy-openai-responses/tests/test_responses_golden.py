"""Golden upstream streams: decoded to IR, re-encoded by the client encoder, and
decoded again; plus arbitrary re-chunking (hypothesis)."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cheapproxy import ir
from cheapproxy_openai_responses.common import PROTOCOL

from responses_testlib import ctx, decode_stream, encode_stream, fixture, frames, meaning

P = PROTOCOL

EXPECTED = {
    "text.sse": {
        "id": "resp_0a1b2c3d4e5f60718293a4b5c6d7e8f9", "model": "gpt-5-mini-2025-08-07",
        "parts": [("reasoning", "", None, None), ("text", "Paris is the capital of France — café included.")],
        "stop": ir.StopReason.END_TURN,
        "usage": ir.Usage(input_tokens=138, cache_read_tokens=1152, output_tokens=18),
    },
    "tool_call.sse": {
        "id": "resp_68b0c1d2e3f4a5b6c7d8e9f0a1b2c3d4", "model": "gpt-5-codex",
        "parts": [("reasoning", "**Listing files**\n\nI should run ls.", "gAAAAABosMHS-encrypted-final==", P),
                  ("call", "call_Qm3xZ8vT1rYp", "exec_command", "function", '{"cmd":"ls -la"}')],
        "stop": ir.StopReason.TOOL_USE,
        "usage": ir.Usage(input_tokens=457, cache_read_tokens=4864, output_tokens=212, reasoning_tokens=128),
    },
    "custom_tool.sse": {
        "id": "resp_cus7001", "model": "gpt-5.1-codex",
        "parts": [("text", "Creating the file."),
                  ("call", "call_Ap7Ch", "apply_patch", "custom",
                   '*** Begin Patch\n*** Add File: hello.py\n+print("hi")\n*** End Patch\n')],
        "stop": ir.StopReason.TOOL_USE,
        "usage": ir.Usage(input_tokens=900, output_tokens=60),
    },
    "parallel_done.sse": {
        "id": "resp_par01", "model": "gpt-4.1-2025-04-14",
        "parts": [("call", "call_w1", "get_weather", "function", '{"city":"Paris"}'),
                  ("call", "call_t2", "get_time", "function", '{"tz":"Europe/Paris"}')],
        "stop": ir.StopReason.TOOL_USE,
        "usage": ir.Usage(input_tokens=310, output_tokens=48),
    },
    "incomplete.sse": {
        "id": "resp_inc01", "model": "o4-mini-2025-04-16",
        "parts": [("reasoning", "**Counting**\n\nOne, two", None, None), ("text", "1, 2, 3,")],
        "stop": ir.StopReason.MAX_TOKENS,
        "usage": ir.Usage(input_tokens=20, output_tokens=64, reasoning_tokens=56),
    },
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_stream_decodes_to_expected_ir(name: str) -> None:
    events = decode_stream(fixture(name))
    exp = EXPECTED[name]
    assert isinstance(events[0], ir.MessageStart)
    assert (events[0].id, events[0].model) == (exp["id"], exp["model"])
    assert isinstance(events[-1], ir.MessageStop)
    assert not any(isinstance(e, ir.StreamError) for e in events)
    # blocks are contiguous and never interleave
    open_idx = None
    for e in events:
        if isinstance(e, ir.PartStart):
            assert open_idx is None
            open_idx = e.index
        elif isinstance(e, (ir.TextDelta, ir.ReasoningDelta, ir.ToolCallDelta)):
            assert e.index == open_idx
        elif isinstance(e, ir.PartStop):
            assert e.index == open_idx
            open_idx = None
    got = meaning(ir.collect(events))
    assert got == {"parts": exp["parts"], "stop": exp["stop"], "usage": exp["usage"]}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_round_trip_through_client_encoder(name: str) -> None:
    first = ir.collect(decode_stream(fixture(name)))
    out = encode_stream(decode_stream(fixture(name)), ctx())
    fr = frames(out)
    # native framing: event line equals the JSON type, sequence numbers 0..n-1, no [DONE]
    assert all(ev == data["type"] for ev, data in fr)
    assert [d["sequence_number"] for _, d in fr] == list(range(len(fr)))
    assert b"[DONE]" not in out
    assert fr[0][1]["type"] == "response.created" and fr[1][1]["type"] == "response.in_progress"
    terminal = fr[-1][1]
    assert terminal["type"] == ("response.incomplete" if first.stop_reason is ir.StopReason.MAX_TOKENS
                                else "response.completed")
    # the terminal snapshot carries the full output and the usage in wire terms
    u = first.usage
    assert terminal["response"]["usage"]["input_tokens"] == u.input_tokens + u.cache_read_tokens
    assert terminal["response"]["usage"]["input_tokens_details"]["cached_tokens"] == u.cache_read_tokens
    assert terminal["response"]["usage"]["output_tokens_details"]["reasoning_tokens"] == u.reasoning_tokens
    done_items = [d["item"] for _, d in fr if d["type"] == "response.output_item.done"]
    assert terminal["response"]["output"] == done_items
    again = ir.collect(decode_stream(out))
    assert meaning(again) == meaning(first)


def test_golden_incomplete_keeps_reason_and_paragraphs() -> None:
    out = encode_stream(decode_stream(fixture("incomplete.sse")), ctx())
    terminal = frames(out)[-1][1]["response"]
    assert terminal["status"] == "incomplete"
    assert terminal["incomplete_details"] == {"reason": "max_output_tokens"}
    assert terminal["output"][0]["summary"] == [{"type": "summary_text", "text": "**Counting**\n\nOne, two"}]


def test_golden_failed_stream_is_an_error_then_reencoded_as_failed() -> None:
    events = decode_stream(fixture("failed.sse"))
    assert isinstance(events[-1], ir.StreamError)
    assert events[-1].message == "upstream failed: The model produced invalid content."
    assert (events[-1].kind, events[-1].status) == ("upstream_failed", 502)
    assert [type(e).__name__ for e in events[:-1]] == ["MessageStart", "PartStart", "TextDelta"]
    out = encode_stream(events, ctx())
    fr = frames(out)
    assert [d["type"] for _, d in fr][-2:] == ["error", "response.failed"]
    err = fr[-2][1]
    assert err["error"]["message"] == err["message"] == "upstream failed: The model produced invalid content."
    assert err["error"]["code"] == "server_error"
    failed = fr[-1][1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "server_error", "message": "upstream failed: The model produced invalid content."}


def test_golden_error_event_nested_shape_maps_rate_limit() -> None:
    events = decode_stream(fixture("error_event.sse"))
    assert isinstance(events[0], ir.MessageStart)
    err = events[-1]
    assert isinstance(err, ir.StreamError)
    assert (err.kind, err.status) == ("rate_limited", 429)
    assert err.message.startswith("upstream failed: Rate limit reached for gpt-4o")


def test_flat_error_event_shape_is_read_too() -> None:
    body = (b'event: error\ndata: {"type":"error","code":"server_error","message":"boom","param":null,'
            b'"sequence_number":0}\n\n')
    events = decode_stream(body)
    assert events == [ir.StreamError(message="upstream failed: boom", kind="upstream_failed", status=502)]


def test_trailing_done_is_tolerated_and_nothing_follows_the_terminal_event() -> None:
    events = decode_stream(fixture("parallel_done.sse") + b"event: response.output_item.added\ndata: {}\n\n")
    assert isinstance(events[-1], ir.MessageStop)
    assert sum(isinstance(e, ir.MessageStop) for e in events) == 1


def test_done_marker_without_terminal_event_is_still_a_cut() -> None:
    body = fixture("text.sse")
    cut = body[: body.index(b"event: response.completed")] + b"data: [DONE]\n\n"
    events = decode_stream(cut)
    assert [type(e).__name__ for e in events].count("StreamError") == 1
    assert "ended before response.completed" in events[-1].message


def test_body_without_terminal_event_is_a_cut_stream() -> None:
    body = fixture("text.sse")
    cut = body[: body.index(b"event: response.output_text.done")]
    events = decode_stream(cut)
    assert isinstance(events[-1], ir.StreamError)
    assert events[-1].kind == "upstream_failed" and "ended before response.completed" in events[-1].message
    assert not any(isinstance(e, ir.MessageStop) for e in events)
    assert ir.collect(events[:-1]).content[-1].text == "Paris is the capital of France — café included."


def test_data_only_framing_gives_the_same_events() -> None:
    body = fixture("custom_tool.sse")
    data_only = b"\n".join(line for line in body.split(b"\n") if not line.startswith(b"event:"))
    assert decode_stream(data_only) == decode_stream(body)


def test_crlf_framing_gives_the_same_events() -> None:
    body = fixture("tool_call.sse")
    assert decode_stream(body.replace(b"\n", b"\r\n")) == decode_stream(body)


def test_final_snapshot_only_upstream_is_replayed() -> None:
    body = (b'event: response.completed\ndata: ' + orjson.dumps({
        "type": "response.completed", "sequence_number": 0, "response": {
            "id": "resp_x", "model": "m", "status": "completed",
            "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]},
                       {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{\"a\":1}"}],
            "usage": {"input_tokens": 3, "output_tokens": 2}}}) + b"\n\n")
    resp = ir.collect(decode_stream(body))
    assert meaning(resp) == {"parts": [("text", "hi"), ("call", "c1", "f", "function", '{"a":1}')],
                             "stop": ir.StopReason.TOOL_USE, "usage": ir.Usage(input_tokens=3, output_tokens=2)}


ALL = sorted(EXPECTED) + ["failed.sse", "error_event.sse"]


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(ALL), cuts=st.lists(st.integers(min_value=0, max_value=6000), max_size=40))
def test_any_chunking_gives_the_same_events(name: str, cuts: list[int]) -> None:
    body = fixture(name)
    points = sorted({c % (len(body) + 1) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0] + points, points + [len(body)])]
    assert b"".join(chunks) == body
    assert decode_stream(body, chunks) == decode_stream(body)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(ALL), size=st.integers(min_value=1, max_value=7))
def test_tiny_chunks_give_the_same_events(name: str, size: int) -> None:
    body = fixture(name)
    chunks = [body[i:i + size] for i in range(0, len(body), size)]
    assert decode_stream(body, chunks) == decode_stream(body)
