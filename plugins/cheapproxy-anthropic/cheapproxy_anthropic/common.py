"""Tables and small helpers shared by the anthropic-messages codec modules:
stop reasons, usage, error types, tool ids, effort budgets, signatures."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.errors import ProxyError

NAME = "anthropic-messages"
API_VERSION = "2023-06-01"
MESSAGES_PATH = "/v1/messages"
COUNT_PATH = "/v1/messages/count_tokens"
DEFAULT_MAX_TOKENS = 4096
MIN_BUDGET = 1024

# ---------------------------------------------------------------- stop reasons (protocols.md 5.7)

STOP_FROM_WIRE: dict[str, ir.StopReason] = {
    "end_turn": ir.StopReason.END_TURN,
    "stop_sequence": ir.StopReason.STOP_SEQUENCE,
    "max_tokens": ir.StopReason.MAX_TOKENS,
    "tool_use": ir.StopReason.TOOL_USE,
    "refusal": ir.StopReason.CONTENT_FILTER,
    "pause_turn": ir.StopReason.PAUSE,
    "model_context_window_exceeded": ir.StopReason.CONTEXT_LIMIT,
}

STOP_TO_WIRE: dict[ir.StopReason, str] = {
    ir.StopReason.END_TURN: "end_turn",
    ir.StopReason.STOP_SEQUENCE: "stop_sequence",
    ir.StopReason.MAX_TOKENS: "max_tokens",
    ir.StopReason.TOOL_USE: "tool_use",
    ir.StopReason.CONTENT_FILTER: "refusal",
    ir.StopReason.PAUSE: "pause_turn",
    ir.StopReason.CONTEXT_LIMIT: "model_context_window_exceeded",
    # an upstream failure that still produced a terminal event: nothing better to say
    ir.StopReason.ERROR: "end_turn",
}


def stop_from_wire(value: Any) -> ir.StopReason:
    """Anthropic stop_reason -> IR (null or unknown -> natural end)."""
    return STOP_FROM_WIRE.get(value, ir.StopReason.END_TURN) if isinstance(value, str) else ir.StopReason.END_TURN


def stop_to_wire(reason: ir.StopReason, has_tool_calls: bool) -> str:
    """IR -> Anthropic; a natural end with tool calls is reported as tool_use."""
    if has_tool_calls and reason in (ir.StopReason.END_TURN, ir.StopReason.STOP_SEQUENCE):
        return "tool_use"
    return STOP_TO_WIRE.get(reason, "end_turn")


# ---------------------------------------------------------------- usage (protocols.md 5.8)


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def usage_from_wire(u: Any) -> ir.Usage:
    """Anthropic usage object -> IR (same meaning: input_tokens is uncached)."""
    if not isinstance(u, dict):
        return ir.Usage()
    details = u.get("output_tokens_details")
    reasoning = _int(details.get("thinking_tokens")) if isinstance(details, dict) else 0
    return ir.Usage(
        input_tokens=_int(u.get("input_tokens")),
        output_tokens=_int(u.get("output_tokens")),
        cache_read_tokens=_int(u.get("cache_read_input_tokens")),
        cache_write_tokens=_int(u.get("cache_creation_input_tokens")),
        reasoning_tokens=reasoning,
    )


def usage_to_wire(u: ir.Usage, *, output_tokens: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "input_tokens": u.input_tokens,
        "cache_creation_input_tokens": u.cache_write_tokens,
        "cache_read_input_tokens": u.cache_read_tokens,
        "output_tokens": u.output_tokens if output_tokens is None else output_tokens,
    }
    if u.reasoning_tokens and output_tokens is None:
        out["output_tokens_details"] = {"thinking_tokens": u.reasoning_tokens}
    return out


# ---------------------------------------------------------------- errors (protocols.md 3.8)

_STATUS_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_status_type(err: ProxyError) -> tuple[int, str]:
    """HTTP status and Anthropic error.type for a ProxyError."""
    status = 529 if err.kind == "upstream_overloaded" else err.status
    if err.kind in ("overloaded", "upstream_overloaded"):
        return status, "overloaded_error"
    etype = _STATUS_TYPE.get(status)
    if etype is None:
        etype = "api_error" if status >= 500 else "invalid_request_error"
    return status, etype


def error_body(etype: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": etype, "message": message}})


# an in-stream `error` event's type -> (kind, status) for ir.StreamError
STREAM_ERROR_KIND: dict[str, tuple[str, int]] = {
    "overloaded_error": ("upstream_overloaded", 529),
    "rate_limit_error": ("rate_limited", 429),
    "timeout_error": ("upstream_timeout", 504),
    "request_too_large": ("payload_too_large", 413),
    "invalid_request_error": ("upstream_rejected", 400),
}


def stream_error_from_wire(err: Any) -> ir.StreamError:
    etype = err.get("type") if isinstance(err, dict) else None
    msg = err.get("message") if isinstance(err, dict) else None
    kind, status = STREAM_ERROR_KIND.get(etype or "", ("upstream_failed", 502))
    return ir.StreamError(message=str(msg or etype or "upstream stream error"), kind=kind, status=status)


# ---------------------------------------------------------------- tool ids and arguments

_BAD_ID = re.compile(r"[^a-zA-Z0-9_-]")


def sanitize_tool_id(tool_id: str) -> str:
    """Make an id match ``^[a-zA-Z0-9_-]+$`` (pitfall 11).  Changed ids get a short
    hash of the original so two ids that differ only in bad characters stay
    distinct; the same input always gives the same output (tool_use and
    tool_result stay paired)."""
    if tool_id and not _BAD_ID.search(tool_id):
        return tool_id
    digest = hashlib.sha1(tool_id.encode()).hexdigest()[:8]
    clean = _BAD_ID.sub("_", tool_id)
    return f"{clean}_{digest}" if clean else f"toolu_{digest}"


CUSTOM_TOOL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"input": {"type": "string"}},
    "required": ["input"],
}


def tool_input(call: ir.ToolCallPart) -> dict[str, Any]:
    """The ``input`` object of a tool_use block: parsed arguments, or the raw
    text wrapped as ``{"input": raw}`` (custom tools, unparsable JSON)."""
    if call.kind == "custom":
        return {"input": call.arguments}
    text = call.arguments.strip()
    if not text:
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {"input": call.arguments}
    return value if isinstance(value, dict) else {"input": call.arguments}


# ---------------------------------------------------------------- reasoning budgets

EFFORT_BUDGET = {"minimal": 1024, "low": 1024, "medium": 4096, "high": 16384, "xhigh": 32768, "max": 64000}
# Anthropic's output_config.effort has no "minimal"
WIRE_EFFORTS = ("low", "medium", "high", "xhigh", "max")


def budget_for(reasoning: ir.Reasoning) -> int | None:
    """Thinking budget for a reasoning request, or None when thinking is off."""
    if not reasoning.enabled or reasoning.effort == "none":
        return None
    if reasoning.budget_tokens is not None:
        return max(MIN_BUDGET, reasoning.budget_tokens)
    return EFFORT_BUDGET.get(reasoning.effort or "medium", EFFORT_BUDGET["medium"])


# ---------------------------------------------------------------- foreign reasoning signatures
#
# A client talking Anthropic to a Gemini (or Responses) backed model gets that
# backend's continuity token inside the thinking block's ``signature`` with a
# prefix naming its protocol; the client sends the block back unchanged and the
# decoder restores (signature, signature_protocol), so the token survives the
# round trip without ever being sent to a real Anthropic upstream as its own.

_SIG_PREFIX = "cheapproxy:"


def signature_to_wire(signature: str | None, protocol: str | None) -> str:
    if not signature:
        return ""
    if protocol in (None, NAME):
        return signature
    return f"{_SIG_PREFIX}{protocol}:{signature}"


def signature_from_wire(signature: Any) -> tuple[str | None, str | None]:
    """(signature, signature_protocol) for a wire ``signature`` value."""
    if not isinstance(signature, str) or not signature:
        return None, None
    if signature.startswith(_SIG_PREFIX):
        proto, sep, sig = signature[len(_SIG_PREFIX):].partition(":")
        if sep and proto and sig:
            return sig, proto
    return signature, NAME


def invalid(message: str, param: str | None = None) -> ProxyError:
    return ProxyError("invalid_request", message, param=param)
