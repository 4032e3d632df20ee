"""Non-streamed messages: upstream body -> ir.Response, ir.Response -> client body."""

from __future__ import annotations

from random import getrandbits as _getrandbits
from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.errors import ProxyError

from .common import (
    NAME, sanitize_tool_id, signature_from_wire, signature_to_wire, stop_from_wire, stop_to_wire, tool_input,
    usage_from_wire, usage_to_wire,
)


def new_message_id() -> str:
    # "msg_" + 24 hex digits.  An id names a message and guards nothing, so
    # the random module's generator (reseeded in forked workers) will do: no
    # getrandom syscall per id as with the secrets module.
    return "msg_%024x" % _getrandbits(96)


def part_from_block(block: dict[str, Any]) -> ir.Part | None:
    """One response content block -> IR part (server-tool blocks -> None)."""
    t = block.get("type")
    if t == "text":
        extra = {k: v for k, v in block.items() if k not in ("type", "text") and v is not None}
        return ir.TextPart(text=block.get("text") or "", provider_data={NAME: extra} if extra else {})
    if t == "thinking":
        sig, proto = signature_from_wire(block.get("signature"))
        return ir.ReasoningPart(text=block.get("thinking") or "", signature=sig, signature_protocol=proto)
    if t == "redacted_thinking":
        return ir.ReasoningPart(redacted=block.get("data") or "", signature_protocol=NAME)
    if t == "tool_use":
        args = block.get("input")
        return ir.ToolCallPart(id=str(block.get("id") or ""), name=str(block.get("name") or ""),
                               arguments=orjson.dumps(args if isinstance(args, dict) else {}).decode())
    return None


def decode_response(body: bytes) -> ir.Response:
    """An upstream non-streamed answer -> IR."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ProxyError("upstream_failed", f"{NAME} upstream returned invalid JSON") from None
    if not isinstance(data, dict) or data.get("type") == "error":
        raise ProxyError("upstream_failed", f"{NAME} upstream returned an unexpected body")
    content = [p for b in data.get("content") or [] if isinstance(b, dict) and (p := part_from_block(b)) is not None]
    stop_seq = data.get("stop_sequence")
    return ir.Response(
        id=str(data.get("id") or ""),
        model=str(data.get("model") or ""),
        content=content,
        stop_reason=stop_from_wire(data.get("stop_reason")),
        stop_sequence=stop_seq if isinstance(stop_seq, str) else None,
        usage=usage_from_wire(data.get("usage")),
    )


def block_from_part(p: ir.Part) -> dict[str, Any] | None:
    """One IR part -> a response content block (None for parts a response cannot hold)."""
    if isinstance(p, ir.TextPart):
        if not p.text:
            return None
        block: dict[str, Any] = {"type": "text", "text": p.text}
        citations = (p.provider_data.get(NAME) or {}).get("citations")
        if citations:
            block["citations"] = citations
        return block
    if isinstance(p, ir.ReasoningPart):
        if p.redacted and p.signature_protocol == NAME:
            return {"type": "redacted_thinking", "data": p.redacted}
        if not p.text and not p.signature:
            return None
        sig = signature_to_wire(p.signature, p.signature_protocol)
        return {"type": "thinking", "thinking": p.text, "signature": sig}
    if isinstance(p, ir.ToolCallPart):
        # sanitized for the client too: it may replay the id to a real Anthropic upstream later
        return {"type": "tool_use", "id": sanitize_tool_id(p.id), "name": p.name, "input": tool_input(p)}
    return None  # images/files/tool results never appear in an assistant answer


def encode_response(response: ir.Response, model: str) -> bytes:
    """IR -> the client's non-streamed Messages body (``model`` = the name the client asked for)."""
    content = [b for p in response.content if (b := block_from_part(p)) is not None]
    has_tools = any(b["type"] == "tool_use" for b in content)
    stop = stop_to_wire(response.stop_reason, has_tools)
    return orjson.dumps({
        "id": response.id if response.id.startswith("msg_") else new_message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": response.stop_sequence if stop == "stop_sequence" else None,
        "usage": usage_to_wire(response.usage),
    })


def decode_error(status: int, body: bytes) -> str:
    """Human message of an upstream error body (Anthropic shape, else raw excerpt)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(data.get("message"), str):
            return data["message"]
    text = body[:300].decode("utf-8", "replace").strip()
    return text or f"upstream answered HTTP {status}"
