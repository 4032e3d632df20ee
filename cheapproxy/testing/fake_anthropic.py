"""Loopback fake of the Anthropic Messages API for tests (docs/dev/fakes.md).

Answers are hand-written wire bytes (never produced by cheapproxy's codec), so a
codec bug cannot hide itself.  The fake validates what the real API rejects and
translation bugs typically produce: missing ``max_tokens``/``model``, unknown
top-level fields, empty or whitespace text, ``data:`` prefixes in image data,
tool_use/tool_result pairing and ordering, thinking blocks without a signature,
forced tool_choice or non-default temperature with thinking, a thinking budget
not below ``max_tokens``, ``role: "system"`` messages without the
``mid-conversation-system`` beta header.  The credential is ``x-api-key:
upstream-secret``.

``POST /v1/messages/count_tokens`` answers ``{"input_tokens": N}`` with N the
number of whitespace-separated words in all system and message text (tool
results included).
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

SECRET = "upstream-secret"
MSG_ID = "msg_fake_01"
ANSWER = ["The answer", " is", " 42."]
USAGE_START = {"input_tokens": 10, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 5, "output_tokens": 1}
IMAGE_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}
TOOL_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
BLOCK_TYPES = {"text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking",
               "search_result", "server_tool_use", "web_search_tool_result"}
CHAT_KEYS = {"model", "messages", "max_tokens", "system", "stop_sequences", "temperature", "top_p", "top_k",
             "tools", "tool_choice", "thinking", "output_config", "metadata", "stream", "service_tier",
             "context_management", "cache_control", "container", "mcp_servers", "inference_geo", "speed"}
COUNT_KEYS = {"model", "messages", "system", "tools", "tool_choice", "thinking", "output_config",
              "cache_control", "context_management", "mcp_servers"}


class Invalid(Exception):
    pass


def _error(status: int, etype: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps({"type": "error", "error": {"type": etype, "message": message}, "request_id": "req_fake"})
    return web.Response(status=status, text=body, content_type="application/json",
                        headers={"request-id": "req_fake", **(headers or {})})


# ---------------------------------------------------------------- validation


def _check_text(b: dict[str, Any], where: str, role: str) -> None:
    if not isinstance(b.get("text"), str):
        raise Invalid(f"{where}.text: Field required")
    if not b["text"]:
        raise Invalid(f"{where}: text content blocks must be non-empty")
    if role in ("user", "system") and not b["text"].strip():
        raise Invalid(f"{where}: text content blocks must contain non-whitespace text")


def _check_image(b: dict[str, Any], where: str) -> None:
    src = b.get("source")
    if not isinstance(src, dict):
        raise Invalid(f"{where}.source: Field required")
    if src.get("type") == "base64":
        if src.get("media_type") not in IMAGE_TYPES:
            raise Invalid(f"{where}.source.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'")
        data = src.get("data")
        if not isinstance(data, str) or data.startswith("data:") or not re.fullmatch(r"[A-Za-z0-9+/=\s]+", data):
            raise Invalid(f"{where}.source.data: invalid base64 data")
    elif src.get("type") == "url":
        if not isinstance(src.get("url"), str) or not src["url"].startswith(("http://", "https://")):
            raise Invalid(f"{where}.source.url: must be an http(s) URL")
    elif src.get("type") != "file":
        raise Invalid(f"{where}.source.type: unknown source type")


def _check_block(b: Any, where: str, role: str) -> None:
    if not isinstance(b, dict) or b.get("type") not in BLOCK_TYPES:
        raise Invalid(f"{where}: unknown or missing content block type")
    t = b["type"]
    if role == "system" and t != "text":
        raise Invalid(f"{where}: system messages may only contain text blocks")
    if t == "text":
        _check_text(b, where, role)
    elif t == "image":
        _check_image(b, where)
    elif t == "tool_use":
        if role != "assistant":
            raise Invalid(f"{where}: tool_use blocks are only allowed in assistant messages")
        if not isinstance(b.get("id"), str) or not TOOL_ID.match(b["id"]):
            raise Invalid(f"{where}.id: String should match pattern '^[a-zA-Z0-9_-]+$'")
        if not isinstance(b.get("name"), str) or not isinstance(b.get("input"), dict):
            raise Invalid(f"{where}: tool_use needs a name and an input object")
    elif t == "tool_result":
        if role != "user":
            raise Invalid(f"{where}: tool_result blocks are only allowed in user messages")
        if not isinstance(b.get("tool_use_id"), str):
            raise Invalid(f"{where}.tool_use_id: Field required")
        content = b.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise Invalid(f"{where}.content: Input should be a valid string or list")
        for i, c in enumerate(content if isinstance(content, list) else []):
            _check_block(c, f"{where}.content.{i}", "user")
    elif t == "thinking":
        if role != "assistant":
            raise Invalid(f"{where}: thinking blocks are only allowed in assistant messages")
        if not isinstance(b.get("thinking"), str):
            raise Invalid(f"{where}.thinking: Field required")
        if not isinstance(b.get("signature"), str) or not b["signature"]:
            raise Invalid(f"{where}.thinking.signature: Field required")
    elif t == "redacted_thinking" and not isinstance(b.get("data"), str):
        raise Invalid(f"{where}.data: Field required")


def _blocks(m: dict[str, Any]) -> list[dict[str, Any]]:
    c = m.get("content")
    return [{"type": "text", "text": c}] if isinstance(c, str) else [b for b in c if isinstance(b, dict)]


def _check_messages(msgs: Any, beta: str) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise Invalid("messages: at least one message is required")
    prev_tool_ids: list[str] | None = None
    first = True
    for i, m in enumerate(msgs):
        where = f"messages.{i}"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
            raise Invalid(f"{where}.role: Input should be 'user' or 'assistant'")
        role = m["role"]
        if role == "system":
            if "mid-conversation-system" not in beta:
                raise Invalid(f"{where}.role: Input should be 'user' or 'assistant'")
        elif first:
            if role != "user":
                raise Invalid("messages: first message must use the \"user\" role")
            first = False
        content = m.get("content")
        if isinstance(content, str):
            if role != "assistant" and not content.strip():
                raise Invalid(f"{where}: {role} messages must have non-empty content")
        elif isinstance(content, list):
            if role != "assistant" and not content:
                raise Invalid(f"{where}: {role} messages must have non-empty content")
            for j, b in enumerate(content):
                _check_block(b, f"{where}.content.{j}", role)
        else:
            raise Invalid(f"{where}.content: Input should be a valid string or list")
        if role == "system":
            continue
        blocks = _blocks(m)
        results = [b["tool_use_id"] for b in blocks if b.get("type") == "tool_result"]
        if role == "user":
            wanted = prev_tool_ids or []
            for rid in results:
                if rid not in wanted:
                    raise Invalid(f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: {rid}. "
                                  "Each `tool_result` block must have a corresponding `tool_use` block in the previous message.")
            missing = [t for t in wanted if t not in results]
            if missing:
                raise Invalid(f"{where}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                              + ", ".join(missing))
            kinds = [b.get("type") == "tool_result" for b in blocks]
            if results and kinds != sorted(kinds, reverse=True):
                raise Invalid(f"{where}: tool_result blocks must come first in the user message")
            prev_tool_ids = None
        else:
            if prev_tool_ids:
                raise Invalid(f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                              + ", ".join(prev_tool_ids))
            prev_tool_ids = [b["id"] for b in blocks if b.get("type") == "tool_use"]


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_body(body: Any, beta: str, *, count: bool) -> None:
    if not isinstance(body, dict):
        raise Invalid("body: Input should be a valid JSON object")
    for k in body:
        if k not in (COUNT_KEYS if count else CHAT_KEYS):
            raise Invalid(f"{k}: Extra inputs are not permitted")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise Invalid("model: Field required")
    max_tokens = body.get("max_tokens")
    if not count and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise Invalid("max_tokens: Field required")
    _check_messages(body.get("messages"), beta)
    system = body.get("system")
    if system is not None:
        if isinstance(system, list):
            for i, b in enumerate(system):
                if not isinstance(b, dict) or b.get("type") != "text":
                    raise Invalid(f"system.{i}: Input should be a text block")
                _check_text(b, f"system.{i}", "system")
        elif not isinstance(system, str):
            raise Invalid("system: Input should be a valid string or list")
    for i, t in enumerate(body.get("tools") or []):
        if not isinstance(t, dict):
            raise Invalid(f"tools.{i}: Input should be an object")
        if t.get("type") not in (None, "custom"):
            continue
        if not isinstance(t.get("name"), str) or not TOOL_NAME.match(t["name"]):
            raise Invalid(f"tools.{i}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
        schema = t.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise Invalid(f"tools.{i}.input_schema.type: Input should be 'object'")
    thinking = body.get("thinking")
    thinking_on = False
    if thinking is not None:
        tt = thinking.get("type") if isinstance(thinking, dict) else None
        if tt == "enabled":
            budget = thinking.get("budget_tokens")
            if not isinstance(budget, int) or budget < 1024:
                raise Invalid("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
            if not count and budget >= max_tokens:
                raise Invalid("`max_tokens` must be greater than `thinking.budget_tokens`")
            thinking_on = True
        elif tt == "adaptive":
            thinking_on = True
        elif tt != "disabled":
            raise Invalid("thinking.type: Input tag does not match any of the expected tags")
    tc = body.get("tool_choice")
    if tc is not None:
        if not isinstance(tc, dict) or tc.get("type") not in ("auto", "any", "tool", "none"):
            raise Invalid("tool_choice.type: Input tag does not match any of the expected tags")
        if tc["type"] == "tool" and not isinstance(tc.get("name"), str):
            raise Invalid("tool_choice.tool.name: Field required")
        if thinking_on and tc["type"] in ("any", "tool"):
            raise Invalid("Thinking may not be enabled when tool_choice forces tool use.")
    temp = body.get("temperature")
    if temp is not None:
        if not _is_num(temp) or not 0 <= temp <= 1:
            raise Invalid("temperature: Input should be less than or equal to 1")
        if thinking_on and temp != 1:
            raise Invalid("`temperature` may only be set to 1 when thinking is enabled")
    if thinking_on and body.get("top_k") is not None:
        raise Invalid("`top_k` is not supported when thinking is enabled")
    stop = body.get("stop_sequences")
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise Invalid("stop_sequences: Input should be a valid list of strings")
    meta = body.get("metadata")
    if meta is not None and (not isinstance(meta, dict) or set(meta) - {"user_id"}):
        raise Invalid("metadata: only user_id is permitted")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise Invalid("stream: Input should be a valid boolean")


# ---------------------------------------------------------------- scenarios


def _all_text(body: dict[str, Any]) -> list[str]:
    out: list[str] = []
    system = body.get("system")
    if isinstance(system, str):
        out.append(system)
    elif isinstance(system, list):
        out.extend(b["text"] for b in system)
    for m in body["messages"]:
        for b in _blocks(m):
            if b.get("type") == "text":
                out.append(b["text"])
            elif b.get("type") == "tool_result":
                c = b.get("content")
                out.extend([c] if isinstance(c, str) else [x.get("text", "") for x in c or [] if x.get("type") == "text"])
    return out


def _first_image(body: dict[str, Any]) -> str:
    def walk(blocks: list[dict[str, Any]]) -> str | None:
        for b in blocks:
            if b.get("type") == "image":
                src = b["source"]
                return src.get("media_type") if src.get("type") == "base64" else src.get("type")
            if b.get("type") == "tool_result" and isinstance(b.get("content"), list):
                found = walk(b["content"])
                if found:
                    return found
        return None

    for m in body["messages"]:
        found = walk(_blocks(m))
        if found:
            return found
    return "none"


def _scenario(body: dict[str, Any]) -> tuple[str, list[tuple[Any, ...]], str]:
    """(tag, blocks, stop_reason).  Blocks: ("text", [deltas]) | ("thinking", text, sig)
    | ("tool_use", id, name, [json fragments])."""
    users = [m for m in body["messages"] if m.get("role") == "user"]
    last = _blocks(users[-1]) if users else []
    text = " ".join(b["text"] for b in last if b.get("type") == "text")
    for tag in ("error400", "error500", "error429", "cut", "tool", "parallel", "think", "length", "image", "json", "echo"):
        if f"[{tag}]" in text:
            break
    else:
        tag = ""
    if tag == "tool":
        return tag, [("tool_use", "toolu_fake_01", "get_weather", ['{"city": ', '"Paris"}'])], "tool_use"
    if tag == "parallel":
        return tag, [("tool_use", "toolu_fake_01", "get_weather", ['{"city": ', '"Paris"}']),
                     ("tool_use", "toolu_fake_02", "get_time", ['{"tz": ', '"Europe/Paris"}'])], "tool_use"
    if tag == "think":
        return tag, [("thinking", "Let me think.", "sig-anthropic"), ("text", ANSWER)], "end_turn"
    if tag == "length":
        return tag, [("text", ["The answer", " is"])], "max_tokens"
    if tag == "image":
        return tag, [("text", [f"image: {_first_image(body)}"])], "end_turn"
    if tag == "json":
        return tag, [("text", ['{"answer":', ' 42}'])], "end_turn"
    if tag == "echo":
        system = body.get("system")
        joined = system if isinstance(system, str) else "|".join(b["text"] for b in system or [])
        return tag, [("text", [f"system: {joined}"])], "end_turn"
    results = [b for b in last if b.get("type") == "tool_result"]
    if not tag and results:
        c = results[0].get("content")
        said = c if isinstance(c, str) else "".join(x.get("text", "") for x in c or [] if x.get("type") == "text")
        return "tool_result", [("text", ["Tool said: ", said])], "end_turn"
    return tag, [("text", ANSWER)], "end_turn"


def _usage(tag: str) -> dict[str, Any]:
    u: dict[str, Any] = {"input_tokens": 10, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 5,
                         "output_tokens": 7}
    if tag == "think":
        u["output_tokens_details"] = {"thinking_tokens": 3}
    return u


def _message(body: dict[str, Any], tag: str, blocks: list[tuple[Any, ...]], stop: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    for b in blocks:
        if b[0] == "text":
            content.append({"type": "text", "text": "".join(b[1])})
        elif b[0] == "thinking":
            content.append({"type": "thinking", "thinking": b[1], "signature": b[2]})
        else:
            content.append({"type": "tool_use", "id": b[1], "name": b[2], "input": json.loads("".join(b[3]))})
    return {"id": MSG_ID, "type": "message", "role": "assistant", "model": body["model"], "content": content,
            "stop_reason": stop, "stop_sequence": None, "usage": _usage(tag)}


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _stream_frames(body: dict[str, Any], tag: str, blocks: list[tuple[Any, ...]], stop: str) -> list[bytes]:
    start = {"id": MSG_ID, "type": "message", "role": "assistant", "model": body["model"], "content": [],
             "stop_reason": None, "stop_sequence": None, "usage": dict(USAGE_START)}
    frames = [_sse("message_start", {"type": "message_start", "message": start})]
    for i, b in enumerate(blocks):
        def delta(d: dict[str, Any], i: int = i) -> bytes:
            return _sse("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d})
        if b[0] == "text":
            cb: dict[str, Any] = {"type": "text", "text": ""}
        elif b[0] == "thinking":
            cb = {"type": "thinking", "thinking": "", "signature": ""}
        else:
            cb = {"type": "tool_use", "id": b[1], "name": b[2], "input": {}}
        frames.append(_sse("content_block_start", {"type": "content_block_start", "index": i, "content_block": cb}))
        if i == 0:
            frames.append(_sse("ping", {"type": "ping"}))
        if b[0] == "text":
            frames += [delta({"type": "text_delta", "text": t}) for t in b[1]]
            if tag == "cut":
                return frames[:4]  # message_start, block start, ping, first delta: then the body ends
        elif b[0] == "thinking":
            frames.append(delta({"type": "thinking_delta", "thinking": b[1]}))
            frames.append(delta({"type": "signature_delta", "signature": b[2]}))
        else:
            frames.append(delta({"type": "input_json_delta", "partial_json": ""}))
            frames += [delta({"type": "input_json_delta", "partial_json": f}) for f in b[3]]
        frames.append(_sse("content_block_stop", {"type": "content_block_stop", "index": i}))
    usage: dict[str, Any] = {"output_tokens": 7}
    if tag == "think":
        usage["output_tokens_details"] = {"thinking_tokens": 3}
    frames.append(_sse("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": stop, "stop_sequence": None}, "usage": usage}))
    frames.append(_sse("message_stop", {"type": "message_stop"}))
    return frames


# ---------------------------------------------------------------- app


def make_app(log: list[dict[str, Any]] | None = None) -> web.Application:
    """The fake upstream; every request is appended to ``log`` before answering."""

    async def _read(request: web.Request) -> tuple[Any, web.Response | None]:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if log is not None:
            log.append({"method": request.method, "path": request.path, "query": dict(request.query),
                        "headers": {k.lower(): v for k, v in request.headers.items()}, "body": body})
        if request.headers.get("x-api-key") != SECRET:
            return body, _error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return body, _error(400, "invalid_request_error", "anthropic-version: header is required")
        if body is None:
            return body, _error(400, "invalid_request_error", "body: invalid JSON")
        return body, None

    async def messages(request: web.Request) -> web.StreamResponse:
        body, err = await _read(request)
        if err is not None:
            return err
        try:
            _check_body(body, request.headers.get("anthropic-beta", ""), count=False)
        except Invalid as exc:
            return _error(400, "invalid_request_error", str(exc))
        tag, blocks, stop = _scenario(body)
        if tag == "error400":
            return _error(400, "invalid_request_error", "bad request from fake")
        if tag == "error500":
            return _error(500, "api_error", "internal error from fake")
        if tag == "error429":
            return _error(429, "rate_limit_error", "rate limited by fake", {"retry-after": "1"})
        if not body.get("stream"):
            return web.Response(text=json.dumps(_message(body, tag, blocks, stop)), content_type="application/json",
                                headers={"request-id": "req_fake"})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache", "request-id": "req_fake"})
        await resp.prepare(request)
        for frame in _stream_frames(body, tag, blocks, stop):
            await resp.write(frame)
        await resp.write_eof()
        return resp

    async def count_tokens(request: web.Request) -> web.Response:
        body, err = await _read(request)
        if err is not None:
            return err
        try:
            _check_body(body, request.headers.get("anthropic-beta", ""), count=True)
        except Invalid as exc:
            return _error(400, "invalid_request_error", str(exc))
        words = sum(len(t.split()) for t in _all_text(body))
        return web.Response(text=json.dumps({"input_tokens": words}), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    return app
