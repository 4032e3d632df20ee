"""Non-streamed Response objects (both directions) and error bodies."""

from __future__ import annotations

import re
from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy.protocol import EncodeContext

from .common import (
    PROTOCOL,
    CallStyle,
    envelope,
    error_type_for,
    flat_tool_name,
    message_item,
    reasoning_item,
    response_id,
    status_for_stop,
    stop_from_wire,
    summary_texts,
    tools_by_name,
    unwrap_custom_input,
    usage_from_wire,
    usage_to_wire,
    wrap_signature,
)

# ---------------------------------------------------------------- client side


def encode_response(response: ir.Response, ctx: EncodeContext) -> bytes:
    """IR answer -> the Response object a Responses client expects."""
    rid = response_id(ctx.request_id)
    status, incomplete = status_for_stop(response.stop_reason)
    body = envelope(ctx.model, rid, ctx.created, ctx.request, status)
    body["output"] = output_items(response.content, rid, ctx.request)
    body["incomplete_details"] = incomplete
    body["usage"] = usage_to_wire(response.usage)
    if status == "failed":
        body["error"] = {"code": "server_error", "message": "the upstream failed"}
    return orjson.dumps(body)


def output_items(content: list[ir.Part], rid: str, request: ir.Request | None) -> list[dict[str, Any]]:
    """IR parts -> completed output items (one item per part)."""
    tools = tools_by_name(request)
    suffix = rid[5:]
    out: list[dict[str, Any]] = []
    for i, p in enumerate(content):
        if isinstance(p, ir.TextPart):
            out.append(message_item(f"msg_{suffix}_{i}", p.text, "completed"))
        elif isinstance(p, ir.ReasoningPart):
            out.append(reasoning_item(f"rs_{suffix}_{i}", p.text, wrap_signature(p)))
        elif isinstance(p, ir.ToolCallPart):
            style = CallStyle(p, tools)
            args = unwrap_custom_input(p.arguments) if style.unwrap else p.arguments
            prefix = "ctc" if style.custom else "fc"
            out.append(style.call_item(f"{prefix}_{suffix}_{i}", p.id, args, "completed"))
    return out


def encode_error(err: ProxyError) -> tuple[int, bytes]:
    """``{"error": {"message", "type", "param", "code"}}`` with the OpenAI status."""
    status = 503 if err.kind == "upstream_overloaded" else err.status
    code = err.code
    if code is None:
        if status == 401:
            code = "invalid_api_key"
        elif status == 402:
            code = "insufficient_quota"
        elif status == 413:
            code = "request_too_large"
        elif status == 404 and (err.param == "model" or "model" in err.message.lower()):
            code = "model_not_found"
        elif status == 429:
            code = "rate_limit_exceeded"
    body = {"error": {"message": err.message, "type": error_type_for(status), "param": err.param, "code": code}}
    return status, orjson.dumps(body)


# ---------------------------------------------------------------- upstream side


def decode_response(body: bytes) -> ir.Response:
    """A non-streamed Responses body -> IR."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ProxyError("upstream_failed", "the upstream sent a response that is not JSON") from None
    if not isinstance(obj, dict):
        raise ProxyError("upstream_failed", "the upstream sent a response that is not a JSON object")
    if obj.get("status") == "failed" or (isinstance(obj.get("error"), dict) and "output" not in obj):
        raise failure_error(obj.get("error"))
    content, has_calls = content_from_output(obj.get("output"))
    return ir.Response(
        id=str(obj.get("id") or ""),
        model=str(obj.get("model") or ""),
        content=content,
        stop_reason=stop_from_wire(obj.get("status"), obj.get("incomplete_details"), has_calls),
        usage=usage_from_wire(obj.get("usage")) or ir.Usage(),
    )


def content_from_output(output: Any) -> tuple[list[ir.Part], bool]:
    """Output items -> IR parts, and whether any tool call is among them."""
    parts: list[ir.Part] = []
    has_calls = False
    for item in output or []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message":
            for c in item.get("content") or []:
                if isinstance(c, dict) and c.get("type") in ("output_text", "refusal"):
                    text = c.get("text") if c.get("type") == "output_text" else c.get("refusal")
                    parts.append(ir.TextPart(text=text if isinstance(text, str) else ""))
        elif kind == "reasoning":
            parts.append(reasoning_part(item))
        elif kind in ("function_call", "custom_tool_call"):
            has_calls = True
            parts.append(call_part(item))
        # hosted tool items (web_search_call, ...) are not produced by translated requests
    return parts, has_calls


def reasoning_part(item: dict[str, Any]) -> ir.ReasoningPart:
    enc = item.get("encrypted_content")
    return ir.ReasoningPart(
        text="\n\n".join(summary_texts(item)),
        signature=enc if isinstance(enc, str) and enc else None,
        signature_protocol=PROTOCOL if isinstance(enc, str) and enc else None,
        provider_data={PROTOCOL: {"id": item.get("id"), "summary": item.get("summary") or []}},
    )


def call_part(item: dict[str, Any]) -> ir.ToolCallPart:
    custom = item.get("type") == "custom_tool_call"
    args = item.get("input") if custom else item.get("arguments")
    return ir.ToolCallPart(
        id=str(item.get("call_id") or item.get("id") or ""),
        name=flat_tool_name(item.get("namespace"), str(item.get("name") or "")),
        arguments=args if isinstance(args, str) and (args or custom) else ("" if custom else "{}"),
        kind="custom" if custom else "function",
        provider_data={PROTOCOL: {"id": item.get("id")}} if item.get("id") else {},
    )


# error codes of response.failed / error events -> (kind, status)
_FAILURE_KINDS = {
    "rate_limit_exceeded": ("rate_limited", 429),
    "too_many_requests": ("rate_limited", 429),
    "insufficient_quota": ("upstream_failed", 502),
    "server_is_overloaded": ("upstream_overloaded", 529),
    "overloaded": ("upstream_overloaded", 529),
    "timeout": ("upstream_timeout", 504),
}


def failure_kind(code: Any) -> tuple[str, int]:
    return _FAILURE_KINDS.get(code if isinstance(code, str) else "", ("upstream_failed", 502))


def failure_error(error: Any) -> ProxyError:
    msg, code = error_fields(error)
    kind, status = failure_kind(code)
    return ProxyError(kind, f"upstream failed: {msg}", status=status)


def error_fields(error: Any) -> tuple[str, str | None]:
    """(message, code) of an error object, secrets scrubbed."""
    if isinstance(error, dict):
        msg = error.get("message")
        code = error.get("code") or error.get("type")
        return scrub(msg if isinstance(msg, str) and msg else "unknown error"), code if isinstance(code, str) else None
    return "unknown error", None


_KEYISH = re.compile(r"\b(sk|pk|rk|key)-[A-Za-z0-9_\-*.]{4,}")
_PROVIDED = re.compile(r"(API key provided:)\s*\S+", re.IGNORECASE)


def scrub(msg: str) -> str:
    """Upstream messages can echo (part of) our credential, e.g. OpenAI's
    "Incorrect API key provided: sk-...abcd": never pass that on."""
    msg = _PROVIDED.sub(r"\1 [redacted]", msg)
    return _KEYISH.sub(r"\1-[redacted]", msg)


def decode_error(status: int, body: bytes) -> str:
    """A human message from an upstream error body (no secrets)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return scrub(body[:300].decode("utf-8", "replace")) or f"HTTP {status}"
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        msg, _ = error_fields(obj["error"])
        return msg
    return scrub(body[:300].decode("utf-8", "replace"))
