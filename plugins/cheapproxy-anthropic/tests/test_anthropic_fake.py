"""The fake upstream itself rejects what the real API rejects (so translation
bugs show up) and logs every request per docs/dev/fakes.md."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from cheapproxy.testing.fake_anthropic import make_app

OK_HEADERS = {"x-api-key": "upstream-secret", "anthropic-version": "2023-06-01"}
U = {"role": "user", "content": "hi"}


def body(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 100, "messages": [U], **kw}


@pytest.fixture
async def fake(aiohttp_client: Any) -> Any:
    log: list[dict[str, Any]] = []
    client = await aiohttp_client(make_app(log))
    client.log = log
    return client


async def test_log_and_plain_answer(fake: Any) -> None:
    r = await fake.post("/v1/messages?beta=true", json=body(), headers={**OK_HEADERS, "X-Extra": "1"})
    assert r.status == 200
    data = await r.json()
    assert data["content"] == [{"type": "text", "text": "The answer is 42."}] and data["model"] == "m"
    assert data["usage"] == {"input_tokens": 10, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 5,
                             "output_tokens": 7}
    (entry,) = fake.log
    assert (entry["method"], entry["path"], entry["query"]) == ("POST", "/v1/messages", {"beta": "true"})
    assert entry["headers"]["x-extra"] == "1" and entry["body"] == body()


@pytest.mark.parametrize(("payload", "fragment"), [
    ({"model": "m", "messages": [U]}, "max_tokens"),
    ({"max_tokens": 5, "messages": [U]}, "model"),
    (body(n=2), "n: Extra inputs are not permitted"),
    (body(messages=[]), "at least one message"),
    (body(messages=[{"role": "assistant", "content": "x"}, U]), "first message"),
    (body(messages=[U, {"role": "system", "content": "s"}]), "role"),
    (body(messages=[{"role": "user", "content": [{"type": "text", "text": "  "}]}]), "non-whitespace"),
    (body(messages=[U, {"role": "assistant", "content": [{"type": "text", "text": ""}]}]), "non-empty"),
    (body(messages=[{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "data:image/png;base64,iVBO"}}]}]), "base64"),
    (body(messages=[U, {"role": "assistant", "content": [{"type": "tool_use", "id": "a.b", "name": "f", "input": {}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a.b"}]}]), "pattern"),
    (body(messages=[U, {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                    {"role": "user", "content": "no results"}]), "without `tool_result`"),
    (body(messages=[U, {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                    {"role": "user", "content": [{"type": "text", "text": "x"},
                                                 {"type": "tool_result", "tool_use_id": "t1"}]}]), "must come first"),
    (body(messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "zz"}]}]), "unexpected `tool_use_id`"),
    (body(messages=[U, {"role": "assistant", "content": [{"type": "thinking", "thinking": "t"}]}]), "signature"),
    (body(thinking={"type": "enabled", "budget_tokens": 100}), "1024"),
    (body(thinking={"type": "enabled", "budget_tokens": 2000}), "greater than `thinking.budget_tokens`"),
    (body(max_tokens=5000, thinking={"type": "adaptive"}, tools=[{"name": "f", "input_schema": {"type": "object"}}],
          tool_choice={"type": "any"}), "forces tool use"),
    (body(max_tokens=5000, thinking={"type": "adaptive"}, temperature=0.5), "temperature"),
    (body(temperature=1.5), "temperature"),
    (body(tools=[{"name": "f", "input_schema": {"properties": {}}}]), "input_schema.type"),
])
async def test_rejections(fake: Any, payload: dict[str, Any], fragment: str) -> None:
    r = await fake.post("/v1/messages", data=orjson.dumps(payload), headers=OK_HEADERS)
    assert r.status == 400
    data = await r.json()
    assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
    assert fragment in data["error"]["message"]


async def test_credentials_and_version(fake: Any) -> None:
    r = await fake.post("/v1/messages", json=body(), headers={"anthropic-version": "2023-06-01",
                                                              "authorization": "Bearer upstream-secret"})
    assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"
    r = await fake.post("/v1/messages", json=body(), headers={"x-api-key": "upstream-secret"})
    assert r.status == 400 and "anthropic-version" in (await r.json())["error"]["message"]


async def test_system_role_accepted_with_beta(fake: Any) -> None:
    payload = body(messages=[U, {"role": "system", "content": "reminder"}])
    r = await fake.post("/v1/messages", json=payload, headers={**OK_HEADERS, "anthropic-beta": "mid-conversation-system-2026-04-07"})
    assert r.status == 200


async def test_error_scenarios_and_stream_bytes(fake: Any) -> None:
    r = await fake.post("/v1/messages", json=body(messages=[{"role": "user", "content": "[error429]"}]), headers=OK_HEADERS)
    assert r.status == 429 and r.headers["retry-after"] == "1"
    assert (await r.json())["error"] == {"type": "rate_limit_error", "message": "rate limited by fake"}
    r = await fake.post("/v1/messages", json=body(stream=True, messages=[{"role": "user", "content": "[tool]"}]),
                        headers=OK_HEADERS)
    raw = await r.read()
    assert r.headers["content-type"].startswith("text/event-stream")
    assert raw.count(b"event: content_block_delta") == 3 and raw.endswith(b'event: message_stop\ndata: {"type": "message_stop"}\n\n')
    assert b'"partial_json": "{\\"city\\": "' in raw


async def test_count_tokens_endpoint(fake: Any) -> None:
    payload = {"model": "m", "system": "a b", "messages": [{"role": "user", "content": "c d e"}]}
    r = await fake.post("/v1/messages/count_tokens", json=payload, headers=OK_HEADERS)
    assert r.status == 200 and await r.json() == {"input_tokens": 5}
    r = await fake.post("/v1/messages/count_tokens", json={**payload, "max_tokens": 5}, headers=OK_HEADERS)
    assert r.status == 400
