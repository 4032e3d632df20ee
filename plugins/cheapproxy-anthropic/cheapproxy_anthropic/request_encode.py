"""Upstream side: ir.Request -> an Anthropic Messages request body (translation).

Rules applied here (protocols.md 3.3, 5.1-5.6, pitfalls 2, 5, 6, 10, 11):
mid-conversation system messages are folded into the top-level ``system`` in
order; consecutive same-role turns are merged; the first turn is made a user
turn; empty and whitespace-only text blocks are dropped; every tool_result of a
step goes first in the next user turn, missing ones are synthesized as errors
and orphaned ones become text; tool ids are sanitized the same way in tool_use
and tool_result; thinking blocks are sent only with an Anthropic signature.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from cheapproxy import ir

from .common import (
    CUSTOM_TOOL_SCHEMA, DEFAULT_MAX_TOKENS, NAME, WIRE_EFFORTS, budget_for, invalid, sanitize_tool_id, tool_input,
)

IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
JSON_MODE_INSTRUCTION = "Respond with a single valid JSON object and nothing else."
PLACEHOLDER_USER_TEXT = "..."  # first turn must be a user turn (new-api uses the same filler)
MISSING_RESULT_TEXT = "No result was provided for this tool call."
# request extras from an Anthropic client that are safe to send back without beta headers
_SAFE_EXTRAS = ("service_tier",)


def _sniff_image(data: str) -> str | None:
    try:
        head = base64.b64decode(data[:24] + "=" * (-len(data[:24]) % 4), validate=False)
    except (binascii.Error, ValueError):
        return None
    if head.startswith(b"\x89PNG"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"GIF8"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def _split_data_url(url: str) -> tuple[str | None, str]:
    """``data:image/png;base64,XXX`` -> ("image/png", "XXX")."""
    head, _, data = url.partition(",")
    media = head[5:].split(";")[0] or None
    return media, data


def _extras(part: Any) -> dict[str, Any]:
    return dict(part.provider_data.get(NAME) or {})


def _image_block(p: ir.ImagePart) -> dict[str, Any]:
    data, media, url = p.data, p.media_type, p.url
    if data is None and url and url.startswith("data:"):
        media_from_url, data = _split_data_url(url)
        media = media or media_from_url
    if data is not None:
        if data.startswith("data:"):  # pitfall 10: a data-URL prefix left in the data
            media_from_url, data = _split_data_url(data)
            media = media or media_from_url
        media = "image/jpeg" if media == "image/jpg" else media
        media = media or _sniff_image(data)
        if media not in IMAGE_TYPES:
            raise invalid(f"image media type {media or 'unknown'} is not supported by {NAME} "
                          "(jpeg, png, gif, webp only)", "image")
        source: dict[str, Any] = {"type": "base64", "media_type": media, "data": data}
    elif url:
        source = {"type": "url", "url": url}
    else:
        raise invalid("an image part has neither data nor url", "image")
    block = {"type": "image", "source": source}
    block.update({k: v for k, v in _extras(p).items() if k == "cache_control"})
    return block


def _file_block(p: ir.FilePart) -> dict[str, Any]:
    extra = _extras(p)
    block_type = extra.pop("block_type", None)
    if p.file_id is not None:
        if block_type is None:  # another provider's file id means nothing to Anthropic
            raise invalid(f"file_id references are not supported by {NAME}", "file")
        block: dict[str, Any] = {"type": block_type, "source": {"type": "file", "file_id": p.file_id}}
    elif p.media_type and p.media_type.startswith("image/"):
        return _image_block(ir.ImagePart(media_type=p.media_type, data=p.data, url=p.url))
    elif p.data is not None:
        if p.media_type == "application/pdf":
            source: dict[str, Any] = {"type": "base64", "media_type": "application/pdf", "data": p.data}
        elif p.media_type == "text/plain":
            text = base64.b64decode(p.data).decode("utf-8", "replace")
            source = {"type": "text", "media_type": "text/plain", "data": text}
        else:
            raise invalid(f"file type {p.media_type or 'unknown'} is not supported by {NAME}", "file")
        block = {"type": "document", "source": source}
    elif p.url:
        block = {"type": "document", "source": {"type": "url", "url": p.url}}
    else:
        raise invalid("a file part has no data, url or file id", "file")
    if p.filename and block["type"] == "document":
        block["title"] = p.filename
    block.update({k: v for k, v in extra.items() if k in ("cache_control", "context", "citations", "title")})
    return block


def _text_block(p: ir.TextPart) -> dict[str, Any] | None:
    if not p.text.strip():  # pitfall 2: empty or whitespace-only text is a 400
        return None
    block: dict[str, Any] = {"type": "text", "text": p.text}
    block.update({k: v for k, v in _extras(p).items() if k in ("cache_control", "citations")})
    return block


def _result_block(p: ir.ToolResultPart) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    for c in p.content:
        if isinstance(c, ir.TextPart):
            b = _text_block(c)
            if b is not None:
                content.append(b)
        elif isinstance(c, ir.ImagePart):
            content.append(_image_block(c))
        elif isinstance(c, ir.FilePart):
            content.append(_file_block(c))
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": sanitize_tool_id(p.tool_call_id)}
    if content:
        block["content"] = content
    if p.is_error:
        block["is_error"] = True
    block.update({k: v for k, v in _extras(p).items() if k == "cache_control"})
    return block


def _block(p: ir.Part) -> dict[str, Any] | None:
    if isinstance(p, ir.TextPart):
        return _text_block(p)
    if isinstance(p, ir.ImagePart):
        return _image_block(p)
    if isinstance(p, ir.FilePart):
        return _file_block(p)
    if isinstance(p, ir.ToolCallPart):
        block = {"type": "tool_use", "id": sanitize_tool_id(p.id), "name": p.name, "input": tool_input(p)}
        block.update({k: v for k, v in _extras(p).items() if k == "cache_control"})
        return block
    if isinstance(p, ir.ToolResultPart):
        return _result_block(p)
    if isinstance(p, ir.ReasoningPart):
        # pitfall 6 / 16: only Anthropic's own continuity tokens can be replayed
        if p.signature_protocol != NAME:
            return None
        if p.redacted:
            return {"type": "redacted_thinking", "data": p.redacted}
        if p.signature:
            return {"type": "thinking", "thinking": p.text, "signature": p.signature}
        return None
    return None


def _result_text(block: dict[str, Any]) -> str:
    texts = [c.get("text", "") for c in block.get("content", []) if c.get("type") == "text"]
    return f"[tool result {block['tool_use_id']}] " + "\n".join(texts)


def _repair_pairing(turns: list[list[Any]]) -> None:
    """Every tool_use answered in the next user turn; results first; orphans -> text."""
    prev_ids: list[str] = []
    for turn in turns:
        role, blocks = turn
        if role == "assistant":
            prev_ids = [b["id"] for b in blocks if b["type"] == "tool_use"]
            continue
        results = [b for b in blocks if b["type"] == "tool_result"]
        others = [b for b in blocks if b["type"] != "tool_result"]
        kept, orphans, seen = [], [], set()
        for b in results:
            if b["tool_use_id"] in prev_ids and b["tool_use_id"] not in seen:
                seen.add(b["tool_use_id"])
                kept.append(b)
            else:
                orphans.append({"type": "text", "text": _result_text(b)})
        for tid in prev_ids:
            if tid not in seen:  # a cancelled call: the API wants an answer for every tool_use
                kept.append({"type": "tool_result", "tool_use_id": tid, "is_error": True,
                             "content": [{"type": "text", "text": MISSING_RESULT_TEXT}]})
        turn[1] = kept + orphans + others
        prev_ids = []


def _turns(messages: list[ir.Message], system: list[dict[str, Any]]) -> list[dict[str, Any]]:
    turns: list[list[Any]] = []
    for m in messages:
        if m.role == "system":
            # one system slot: mid-conversation system text is folded in order (position lost)
            system.extend(b for p in m.content if isinstance(p, ir.TextPart) and (b := _text_block(p)))
            continue
        blocks = [b for p in m.content if (b := _block(p)) is not None]
        if not blocks:
            continue
        if turns and turns[-1][0] == m.role:
            turns[-1][1].extend(blocks)
        else:
            turns.append([m.role, blocks])
    if not turns:
        raise invalid(f"{NAME} needs at least one non-empty user or assistant message", "messages")
    if turns[0][0] != "user":
        turns.insert(0, ["user", [{"type": "text", "text": PLACEHOLDER_USER_TEXT}]])
    _repair_pairing(turns)
    return [{"role": r, "content": b} for r, b in turns]


def _tool(t: ir.Tool) -> dict[str, Any]:
    if t.kind == "custom":
        schema: dict[str, Any] = dict(CUSTOM_TOOL_SCHEMA)
    else:
        schema = dict(t.parameters) if t.parameters else {}
        schema.setdefault("type", "object")
        if schema.get("type") == "object":
            schema.setdefault("properties", {})
    out: dict[str, Any] = {"name": t.name}
    if t.description:
        out["description"] = t.description
    out["input_schema"] = schema
    if t.strict:
        out["strict"] = True
    out.update({k: v for k, v in _extras(t).items() if k == "cache_control"})
    return out


def _tool_choice(tc: ir.ToolChoice, thinking: bool) -> dict[str, Any]:
    mode = tc.mode
    # extended thinking accepts only auto/none: downgrade forced choices (documented lossy)
    if thinking and mode in ("required", "tool"):
        mode = "auto"
    out: dict[str, Any]
    if mode == "none":
        return {"type": "none"}
    if mode == "required":
        out = {"type": "any"}
    elif mode == "tool" and tc.name:
        out = {"type": "tool", "name": tc.name}
    else:
        out = {"type": "auto"}
    if tc.parallel is False:
        out["disable_parallel_tool_use"] = True
    return out


def _system(request: ir.Request) -> list[dict[str, Any]]:
    return [b for p in request.system if (b := _text_block(p)) is not None]


def encode_body(request: ir.Request, upstream_model: str, *, stream: bool) -> dict[str, Any]:
    """The JSON body for POST /v1/messages."""
    if request.n is not None and request.n > 1:
        raise invalid(f"n > 1 is not supported by {NAME}", "n")
    system = _system(request)
    messages = _turns(request.messages, system)
    body: dict[str, Any] = {"model": upstream_model}
    max_tokens = request.max_tokens if request.max_tokens else DEFAULT_MAX_TOKENS
    output_config: dict[str, Any] = {}
    thinking_on = False
    r = request.reasoning
    if r is not None and r.adaptive and r.enabled and r.effort != "none":
        body["thinking"] = {"type": "adaptive"}
        if r.effort:
            output_config["effort"] = r.effort if r.effort in WIRE_EFFORTS else "low"
        thinking_on = True
    elif r is not None and (budget := budget_for(r)) is not None:
        body["thinking"] = {"type": "enabled", "budget_tokens": budget}
        if max_tokens <= budget:  # budget must stay below max_tokens: keep the answer's room too
            max_tokens += budget
        thinking_on = True
    body["max_tokens"] = max_tokens
    rf = request.response_format
    if rf is not None and rf.type == "json_schema" and rf.schema is not None:
        output_config["format"] = {"type": "json_schema", "schema": rf.schema}
    elif rf is not None and rf.type in ("json_object", "json_schema"):
        system.append({"type": "text", "text": JSON_MODE_INSTRUCTION})
    if system:
        body["system"] = system
    body["messages"] = messages
    if request.tools:
        body["tools"] = [_tool(t) for t in request.tools]
        if request.tool_choice is not None:
            body["tool_choice"] = _tool_choice(request.tool_choice, thinking_on)
    if request.stop:
        body["stop_sequences"] = list(request.stop)
    if thinking_on:
        # thinking forbids temperature/top_k changes and limits top_p to [0.95, 1]
        if request.top_p is not None:
            body["top_p"] = min(1.0, max(0.95, float(request.top_p)))
    else:
        if request.temperature is not None:
            body["temperature"] = min(1.0, max(0.0, float(request.temperature)))  # Anthropic range is 0..1
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.top_k is not None:
            body["top_k"] = request.top_k
    if output_config:
        body["output_config"] = output_config
    extras = request.provider_data.get(NAME) or {}
    meta = dict(extras.get("metadata") or {}) if isinstance(extras.get("metadata"), dict) else {}
    if request.user:
        meta["user_id"] = request.user
    if meta:
        body["metadata"] = meta
    for key in _SAFE_EXTRAS:
        if key in extras:
            body[key] = extras[key]
    if stream:
        body["stream"] = True
    return body


def encode_count_body(request: ir.Request, upstream_model: str) -> dict[str, Any]:
    """The JSON body for POST /v1/messages/count_tokens (no max_tokens, stream, sampling)."""
    full = encode_body(request, upstream_model, stream=False)
    keep = ("model", "system", "messages", "tools", "tool_choice", "thinking")
    return {k: full[k] for k in keep if k in full}
