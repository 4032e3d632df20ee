"""Same-protocol relay: request body with only the model replaced, response
bytes relayed with usage read on the way."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai_chat_helpers import CODEC, fixture, inbound, sse_payloads

from cheapproxy import ir
from cheapproxy.testing.fake_openai_chat import make_app
from cheapproxy.testing.taps import relayed

BODY = {
    "model": "client-name",
    "messages": [{"role": "user", "content": "hi"}],
    "temperature": 0.7,
    "logit_bias": {"50256": -100},
    "web_search_options": {},
    "stream": True,
    "stream_options": {"include_obfuscation": False},
}
USAGE_TEXT = ir.Usage(input_tokens=186, output_tokens=6, cache_read_tokens=1024)


def test_request_replaces_only_the_model_and_forces_usage() -> None:
    up = CODEC.passthrough_request(inbound(BODY), "gpt-4o-2024-11-20")
    assert (up.path, up.stream) == ("/chat/completions", True)
    sent = orjson.loads(up.body)
    assert sent == {**BODY, "model": "gpt-4o-2024-11-20", "stream_options": {"include_obfuscation": False, "include_usage": True}}
    assert BODY["stream_options"] == {"include_obfuscation": False}  # the client's body is not mutated
    plain = {k: v for k, v in BODY.items() if k not in ("stream", "stream_options")}
    up = CODEC.passthrough_request(inbound(plain), "gpt-4o")
    assert orjson.loads(up.body) == {**plain, "model": "gpt-4o"} and up.stream is False


def test_embeddings_request_goes_to_embeddings_path() -> None:
    body = {"model": "emb", "input": ["a"], "encoding_format": "base64"}
    up = CODEC.passthrough_request(inbound(body, "embeddings"), "text-embedding-3-small")
    assert up.path == "/embeddings" and orjson.loads(up.body) == {**body, "model": "text-embedding-3-small"}


def _split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(body) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(body[prev:p])
        prev = p
    return out + [body[prev:]]


@settings(max_examples=50, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=2100), max_size=30))
def test_client_asked_for_usage_bytes_are_untouched(cuts: list[int]) -> None:
    body = fixture("text_usage.sse")
    pt = CODEC.passthrough(inbound({**BODY, "stream_options": {"include_usage": True}}), stream=True)
    assert relayed(pt, _split(body, cuts)) == body
    assert pt.usage == USAGE_TEXT and pt.complete and pt.output_seen and pt.error_message is None


@settings(max_examples=50, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=2100), max_size=30))
def test_client_did_not_ask_usage_chunk_is_stripped(cuts: list[int]) -> None:
    body = fixture("text_usage.sse")
    pt = CODEC.passthrough(inbound(BODY), stream=True)
    out = relayed(pt, _split(body, cuts))
    frames = body.split(b"\n\n")
    expected = b"\n\n".join(f for f in frames if b'"choices":[]' not in f)
    assert out == expected and len(out) < len(body)
    assert all(f != "[DONE]" and f["choices"] for f in sse_payloads(out)[:-1])
    assert pt.usage == USAGE_TEXT and pt.complete


def test_crlf_stream_is_split_on_crlf_frames() -> None:
    body = fixture("combined_crlf.sse")
    pt = CODEC.passthrough(inbound(BODY), stream=True)
    out = relayed(pt, [body[i : i + 7] for i in range(0, len(body), 7)])
    # the usage here rides on a content chunk: it is read and the chunk kept
    assert out == body
    assert pt.usage == ir.Usage(input_tokens=32, output_tokens=12, cache_read_tokens=8, reasoning_tokens=5)
    assert pt.complete and pt.output_seen


@pytest.mark.parametrize("crlf", [False, True])
@pytest.mark.parametrize("strip", [False, True])
@pytest.mark.parametrize("cut", [None, 3, -12])
def test_bytes_after_the_end_marker_never_reach_the_client(crlf: bool, strip: bool, cut: int | None) -> None:
    """An upstream that writes more after [DONE] in the same read: the client
    gets the stream up to the marker's frame and not a byte after it, and
    a usage object after the marker is not read."""
    body = fixture("text_usage.sse")
    junk = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":999,"completion_tokens":999}}\n\ndata: junk\n\n'
    if crlf:
        body, junk = body.replace(b"\n", b"\r\n"), junk.replace(b"\n", b"\r\n")
    assert body.endswith(b"[DONE]\r\n\r\n" if crlf else b"[DONE]\n\n")
    so = {"stream_options": {"include_usage": not strip}}
    pt = CODEC.passthrough(inbound({**BODY, **so}), stream=True)
    whole = body + junk
    pieces = [whole] if cut is None else [whole[:cut], whole[cut:]] if cut > 0 else [whole[: len(body) + cut], whole[len(body) + cut :]]
    out = relayed(pt, pieces)
    assert pt.ended and pt.complete and pt.usage == USAGE_TEXT
    expected = relayed(CODEC.passthrough(inbound({**BODY, **so}), stream=True), [body])
    assert out == expected and out.endswith(b"[DONE]\r\n\r\n" if crlf else b"[DONE]\n\n")


def test_output_seen_only_after_real_content() -> None:
    pt = CODEC.passthrough(inbound(BODY), stream=True)
    role = b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
    assert pt.feed(role) == role and not pt.output_seen
    spaced = b'data: {"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "x"}]}}]}\n\n'
    assert pt.feed(spaced) == spaced and pt.output_seen and not pt.complete


def test_error_and_cut_streams() -> None:
    pt = CODEC.passthrough(inbound(BODY), stream=True)
    body = fixture("error_midstream.sse")
    assert relayed(pt, [body]) == body
    assert pt.error_message == "The server had an error while processing your request. Sorry about that!"
    assert not pt.complete and pt.usage is None
    pt = CODEC.passthrough(inbound(BODY), stream=True)
    body = fixture("cut.sse")
    assert relayed(pt, [body[:50], body[50:]]) == body
    assert not pt.complete and pt.output_seen and pt.error_message is None


def test_content_mentioning_usage_and_error_is_not_misread() -> None:
    pt = CODEC.passthrough(inbound(BODY), stream=True)
    frame = orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": '{"usage": {"error": 1}}'}}]})
    data = b"data: " + frame + b"\n\n"
    assert pt.feed(data) == data
    assert pt.usage is None and pt.error_message is None and pt.output_seen


def test_non_streamed_body_and_usage_from_body() -> None:
    body = orjson.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 15, "completion_tokens": 7, "total_tokens": 22,
                  "prompt_tokens_details": {"cached_tokens": 5, "cache_write_tokens": 2},
                  "completion_tokens_details": {"reasoning_tokens": 3}},
    })
    expected = ir.Usage(input_tokens=8, output_tokens=7, cache_read_tokens=5, cache_write_tokens=2, reasoning_tokens=3)
    assert CODEC.usage_from_body(body) == expected
    pt = CODEC.passthrough(inbound({**BODY, "stream": False}), stream=False)
    assert relayed(pt, [body[:20], body[20:]]) == body
    assert pt.usage == expected and pt.complete and pt.output_seen
    emb = b'{"object":"list","data":[],"model":"e","usage":{"prompt_tokens":8,"total_tokens":8}}'
    assert CODEC.usage_from_body(emb) == ir.Usage(input_tokens=8)
    assert CODEC.usage_from_body(b"not json") is None


@pytest.mark.parametrize("client_usage", [False, True])
async def test_relay_through_the_fake(aiohttp_server: Any, client_usage: bool) -> None:
    server = await aiohttp_server(make_app())
    body = {"model": "my-name", "messages": [{"role": "user", "content": "[tool] go"}], "stream": True,
            "tools": [{"type": "function", "function": {"name": "get_weather"}}]}
    if client_usage:
        body["stream_options"] = {"include_usage": True}
    inb = inbound(body)
    up = CODEC.passthrough_request(inb, "gpt-upstream")
    pt = CODEC.passthrough(inb, stream=True)
    out = b""
    async with aiohttp.ClientSession() as s:
        async with s.post(str(server.make_url("/v1")) + up.path, data=up.body,
                          headers={"Authorization": "Bearer upstream-secret", **up.headers}) as r:
            assert r.status == 200
            async for chunk in r.content.iter_any():
                out += pt.feed(chunk)
    out += pt.close()
    assert pt.usage == ir.Usage(input_tokens=10, output_tokens=7, cache_read_tokens=5) and pt.complete
    frames = sse_payloads(out)
    assert frames[-1] == "[DONE]"
    assert any(f["choices"] == [] for f in frames[:-1]) is client_usage
    args = "".join(tc["function"].get("arguments", "") for f in frames[:-1] if f["choices"]
                   for tc in f["choices"][0]["delta"].get("tool_calls", []))
    assert orjson.loads(args) == {"city": "Paris"}


# ---- the byte-level tap against a reference that parses every frame

_DELTA = st.sampled_from(["", "Sure", "[DONE]", '"error"', "data: [DONE]", "usage", "\u00e9\u4e2d"])


def _frame(kind: str, text: str, n: int) -> bytes:
    if kind == "delta":
        obj: Any = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}], "usage": None}
    elif kind == "usage_only":
        obj = {"id": "c", "choices": [], "usage": {"prompt_tokens": n, "completion_tokens": n + 1, "total_tokens": 2 * n + 1}}
    elif kind == "usage_on_delta":
        obj = {"id": "c", "choices": [{"index": 0, "delta": {"content": text}}], "usage": {"prompt_tokens": n, "completion_tokens": 1}}
    elif kind == "error":
        obj = {"error": {"message": f"boom {n}", "type": "server_error"}}
    else:
        return b"data: [DONE]\n\n" if n % 2 else b"data:[DONE]\n\n"
    sep = (b": ", b":") if n % 3 == 0 else (b":", b":")
    return b"data" + sep[n % 2] + orjson.dumps(obj).replace(b'"usage":', b'"usage": ' if n % 5 == 0 else b'"usage":') + b"\n\n"


_FRAMES = st.lists(st.tuples(st.sampled_from(["delta", "delta", "delta", "usage_only", "usage_on_delta", "error", "done"]),
                             _DELTA, st.integers(min_value=0, max_value=99)), min_size=1, max_size=25)


@settings(max_examples=300, deadline=None)
@given(frames=_FRAMES, cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=8), strip=st.booleans())
def test_tap_agrees_with_a_full_parse_of_every_frame(frames: list[tuple[str, str, int]], cuts: list[int], strip: bool) -> None:
    """What the tap reads with byte searches (usage, error, end marker, which
    frames it drops) equals what parsing every frame says, however the
    stream is split into reads; '[DONE]', '"error"' and 'usage' inside
    content never count."""
    raw = [_frame(k, t, n) for k, t, n in frames]
    body = b"".join(raw)
    usage, error, complete, kept, upto = None, None, False, [], 0
    for f in raw:
        upto += len(f)
        data = f[5:].strip()
        if data == b"[DONE]":
            complete = True
            kept.append(f)
            break  # what follows the end marker is neither read nor sent
        obj = orjson.loads(data)
        if obj.get("error"):
            error = obj["error"]["message"]
        u = obj.get("usage")
        if isinstance(u, dict):
            usage = u
            if strip and obj.get("choices") == []:
                continue
        kept.append(f)
    pt = CODEC.passthrough(inbound({**BODY, "stream_options": {"include_usage": not strip}}), stream=True)
    out = relayed(pt, _split(body, cuts))
    sent = body[:upto]  # the bytes up to the end of the first end marker
    assert out == (b"".join(kept) if strip else sent)
    assert pt.complete == complete and pt.error_message == error
    if usage is None:
        assert pt.usage is None
    else:
        assert pt.usage is not None and pt.usage.output_tokens == usage.get("completion_tokens", 0)
