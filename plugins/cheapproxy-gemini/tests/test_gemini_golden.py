"""Golden native streams: decoded to IR, re-encoded by the client-side
encoder, decoded again; and arbitrary byte splits decode the same."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cheapproxy import ir
from gemini_helpers import calls_of, decode_stream, encode_stream, fixture_bytes, normalize, split, text_of

U = ir.Usage

GOLDEN = {
    "text.sse": dict(
        text='The capital of France is Paris. It is known for the Eiffel Tower, the Louvre and cafés "on the Seine".\n',
        calls=[], stop=ir.StopReason.END_TURN, usage=U(input_tokens=12, output_tokens=27),
        model="gemini-2.5-flash", id="q0ZxaK2bE9-v1MkPp5nJiQs",
    ),
    "thinking_parallel_tools.sse": dict(
        text="Let me check both.",
        calls=[("get_weather", {"city": "Paris", "unit": "celsius"}),
               ("get_time", {"tz": "Europe/Paris", "nested": {"list": [1, 2.5, None, True]}})],
        stop=ir.StopReason.TOOL_USE,
        usage=U(input_tokens=112, cache_read_tokens=128, output_tokens=121, reasoning_tokens=80),
        model="gemini-2.5-pro", id="t1ZxaOmGJ4qC1MkP3u6b8Ak",
    ),
    "gemini3_text_signature.sse": dict(
        text="Sure, here is a haiku:\nLeaves fall", calls=[], stop=ir.StopReason.END_TURN,
        usage=U(input_tokens=8, output_tokens=119, reasoning_tokens=111),
        model="gemini-3-pro-preview", id="g3ZxaKvYB5yX1MkPnKfR-Aw",
    ),
    "blocked_prompt.sse": dict(
        text="", calls=[], stop=ir.StopReason.CONTENT_FILTER, usage=U(input_tokens=31),
        model="gemini-2.5-flash", id="b0ZxaJ2cN8-v1MkPk9rJiQs",
    ),
    "max_tokens.sse": dict(
        text="Once upon a time, there was", calls=[], stop=ir.StopReason.MAX_TOKENS,
        usage=U(input_tokens=6, output_tokens=7), model="gemini-2.5-flash-lite", id="m0ZxaA",
    ),
    "array_stream.json": dict(
        text='Bonjour [le] {monde} "!"', calls=[], stop=ir.StopReason.END_TURN,
        usage=U(input_tokens=4, output_tokens=6), model="gemini-2.5-flash", id="a0Zx",
    ),
}


def test_text_stream_exact_events() -> None:
    events = decode_stream(fixture_bytes("text.sse"))
    assert events == [
        ir.MessageStart(id="q0ZxaK2bE9-v1MkPp5nJiQs", model="gemini-2.5-flash"),
        ir.PartStart(index=0, part=ir.TextPart(text="")),
        ir.TextDelta(index=0, text="The capital of France"),
        ir.UsageUpdate(usage=U(input_tokens=12, output_tokens=4)),
        ir.TextDelta(index=0, text=" is Paris. It is known for the Eiffel Tower,"),
        ir.UsageUpdate(usage=U(input_tokens=12, output_tokens=15)),
        ir.TextDelta(index=0, text=' the Louvre and cafés "on the Seine".\n'),
        ir.PartStop(index=0),
        ir.UsageUpdate(usage=U(input_tokens=12, output_tokens=27)),
        # cumulative usage: the last value, never the sum (4 + 15 + 27)
        ir.MessageStop(stop_reason=ir.StopReason.END_TURN, usage=U(input_tokens=12, output_tokens=27)),
    ]


def test_thinking_and_parallel_calls_exact_blocks() -> None:
    events = decode_stream(fixture_bytes("thinking_parallel_tools.sse"))
    kinds = [(type(e).__name__, getattr(e, "index", None)) for e in events if not isinstance(e, ir.UsageUpdate)]
    assert kinds == [
        ("MessageStart", None),
        ("PartStart", 0), ("ReasoningDelta", 0), ("ReasoningDelta", 0), ("PartStop", 0),
        ("PartStart", 1), ("TextDelta", 1), ("PartStop", 1),
        # each whole functionCall: start, one delta with the full JSON, stop;
        # indices come from a per-stream counter, not the part position (pitfall 1)
        ("PartStart", 2), ("ToolCallDelta", 2), ("PartStop", 2),
        ("PartStart", 3), ("ToolCallDelta", 3), ("PartStop", 3),
        ("MessageStop", None),
    ]
    stop2 = events[[i for i, e in enumerate(events) if isinstance(e, ir.PartStop)][2]]
    assert stop2.provider_data == {"gemini": {"thoughtSignature": "CtgBAVSoXO6Gx0yJm3p1rQ2kTz8wYb4vNc9eLh5fUa7sDi0gRj+/Kl=="}}
    deltas = [e for e in events if isinstance(e, ir.ToolCallDelta)]
    assert orjson.loads(deltas[0].arguments) == {"city": "Paris", "unit": "celsius"}
    starts = [e.part for e in events if isinstance(e, ir.PartStart) and isinstance(e.part, ir.ToolCallPart)]
    assert [p.name for p in starts] == ["get_weather", "get_time"]
    assert all(p.id.startswith("call_") and len(p.id) == 29 for p in starts)
    assert starts[0].id != starts[1].id
    resp = ir.collect(events)
    assert isinstance(resp.content[0], ir.ReasoningPart)
    assert resp.content[0].text == "**Planning the lookup**\n\nThe user wants weather and time for Paris. I will call both tools in parallel."
    assert resp.content[2].provider_data == {"gemini": {"thoughtSignature": "CtgBAVSoXO6Gx0yJm3p1rQ2kTz8wYb4vNc9eLh5fUa7sDi0gRj+/Kl=="}}


def test_trailing_empty_signature_part_attaches_to_text() -> None:
    resp = ir.collect(decode_stream(fixture_bytes("gemini3_text_signature.sse")))
    assert len(resp.content) == 1  # no empty text block for the signature
    assert resp.content[0].provider_data == {"gemini": {"thoughtSignature": "EpUDCpIDAdHtim9zL2jQxV4bWc8nR1kP3sT6yU0eF5gH7iJ9oA=="}}
    again = encode_stream(decode_stream(fixture_bytes("gemini3_text_signature.sse")))
    assert b'{"text":"","thoughtSignature":"EpUDCpIDAdHtim9zL2jQxV4bWc8nR1kP3sT6yU0eF5gH7iJ9oA=="}' in again


def test_blocked_prompt_is_content_filter() -> None:
    events = decode_stream(fixture_bytes("blocked_prompt.sse"))
    assert [type(e).__name__ for e in events] == ["MessageStart", "UsageUpdate", "MessageStop"]
    assert events[-1] == ir.MessageStop(stop_reason=ir.StopReason.CONTENT_FILTER, usage=U(input_tokens=31))


def test_midstream_error_chunk_becomes_stream_error() -> None:
    events = decode_stream(fixture_bytes("error_midstream.sse"))
    assert events[-1] == ir.StreamError(message="UNAVAILABLE: The model is overloaded. Please try again later.",
                                        kind="upstream_overloaded", status=503)
    assert sum(isinstance(e, ir.StreamError) for e in events) == 1
    assert not any(isinstance(e, ir.MessageStop) for e in events)
    # the client-side encoder turns it into Gemini's in-stream error chunk
    out = encode_stream(events)
    assert out.endswith(b'data: {"error":{"code":503,"message":"UNAVAILABLE: The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}\r\n\r\n')


def test_body_without_finish_reason_is_cut() -> None:
    events = decode_stream(fixture_bytes("cut.sse"))
    assert isinstance(events[-1], ir.StreamError)
    assert events[-1].kind == "upstream_failed" and events[-1].status == 502
    assert "finishReason" in events[-1].message
    assert not any(isinstance(e, ir.MessageStop) for e in events)
    # the same body truncated inside the JSON array form
    arr = fixture_bytes("array_stream.json")
    cut = decode_stream(arr[: arr.index(b',\r\n') + 3])
    assert isinstance(cut[-1], ir.StreamError)


@pytest.mark.parametrize("name", sorted(GOLDEN))
@pytest.mark.parametrize("sse", [True, False])
def test_golden_round_trip(name: str, sse: bool) -> None:
    want = GOLDEN[name]
    events = decode_stream(fixture_bytes(name))
    first = ir.collect(events)
    assert (text_of(first), calls_of(first), first.stop_reason, first.usage) == (
        want["text"], want["calls"], want["stop"], want["usage"])
    assert (first.model, first.id) == (want["model"], want["id"])
    # re-encode for a Gemini client (SSE or JSON array), decode again: same meaning
    wire = encode_stream(events, sse=sse)
    if not sse:
        assert isinstance(orjson.loads(wire), list)  # a valid JSON array document
    again = ir.collect(decode_stream(wire))
    assert text_of(again) == want["text"]
    assert calls_of(again) == want["calls"]
    assert [p.id for p in again.content if isinstance(p, ir.ToolCallPart)] == \
        [p.id for p in first.content if isinstance(p, ir.ToolCallPart)]
    assert again.stop_reason == want["stop"]
    assert again.usage == want["usage"]
    assert again.id == want["id"]
    reasoning = [(p.text, p.signature) for p in first.content if isinstance(p, ir.ReasoningPart)]
    assert [(p.text, p.signature) for p in again.content if isinstance(p, ir.ReasoningPart)] == reasoning
    sigs = [p.provider_data for p in first.content if not isinstance(p, ir.ReasoningPart)]
    assert [p.provider_data for p in again.content if not isinstance(p, ir.ReasoningPart)] == sigs


def test_crlf_lf_and_cr_framing_decode_alike() -> None:
    body = fixture_bytes("text.sse")
    lf = body.replace(b"\r\n", b"\n")
    assert normalize(decode_stream(lf)) == normalize(decode_stream(body))


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(sorted(GOLDEN) + ["error_midstream.sse", "cut.sse"]),
       cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=40))
def test_any_chunking_gives_the_same_events(name: str, cuts: list[int]) -> None:
    body = fixture_bytes(name)
    whole = normalize(decode_stream(body))
    assert normalize(decode_stream(body, split(body, cuts))) == whole


@pytest.mark.parametrize("name", ["thinking_parallel_tools.sse", "array_stream.json", "error_midstream.sse"])
def test_byte_by_byte_feeding(name: str) -> None:
    body = fixture_bytes(name)
    pieces = [body[i:i + 1] for i in range(len(body))]
    assert normalize(decode_stream(body, pieces)) == normalize(decode_stream(body))


def test_bare_json_object_in_a_stream_body() -> None:
    """A stream answered with one JSON object (an error, as some proxies do)
    is decoded, not mistaken for a cut SSE stream."""
    events = decode_stream(b'{\n  "error": {\n    "code": 429,\n    "message": "Quota exceeded.",\n    "status": "RESOURCE_EXHAUSTED"\n  }\n}\n')
    assert events == [ir.StreamError(message="RESOURCE_EXHAUSTED: Quota exceeded.", kind="rate_limited", status=429)]
