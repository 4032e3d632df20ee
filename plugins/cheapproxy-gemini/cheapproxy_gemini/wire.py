"""Small pieces of the Gemini wire format shared by the codec modules: field
spellings, ids, usage, finish reasons and error statuses (protocols.md 4, 5.7,
5.8, 5.11)."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from typing import Any

from cheapproxy import ir

PROTOCOL = "gemini"

# Gemini 3 rejects replayed function calls without a signature; this sentinel
# tells it to skip the check for history it did not produce (pitfall 8).
SKIP_SIGNATURE = "skip_thought_signature_validator"

_CAMEL = re.compile(r"(?<!^)([A-Z])")


@lru_cache(maxsize=256)
def snake(name: str) -> str:
    """``maxOutputTokens`` -> ``max_output_tokens``."""
    return _CAMEL.sub(r"_\1", name).lower()


def get(obj: dict[str, Any], name: str, default: Any = None) -> Any:
    """Read a field in camelCase or snake_case (the SDK mixes both)."""
    v = obj.get(name)
    if v is None:
        v = obj.get(snake(name))
    return default if v is None else v


def new_call_id() -> str:
    """``call_<24 hex>``: Gemini function calls often carry no id."""
    return "call_" + os.urandom(12).hex()


def new_response_id() -> str:
    return os.urandom(12).hex()


# ---------------------------------------------------------------- usage


def usage_from_wire(meta: dict[str, Any] | None) -> ir.Usage | None:
    """usageMetadata -> IR usage.  promptTokenCount includes the cached part;
    thoughts are outside candidatesTokenCount; tool-use prompt tokens are
    billed as input."""
    if not isinstance(meta, dict):
        return None

    def n(key: str) -> int:
        v = get(meta, key, 0)
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0

    prompt = n("promptTokenCount")
    cached = n("cachedContentTokenCount")
    thoughts = n("thoughtsTokenCount")
    return ir.Usage(
        input_tokens=max(prompt - cached, 0) + n("toolUsePromptTokenCount"),
        cache_read_tokens=cached,
        output_tokens=n("candidatesTokenCount") + thoughts,
        reasoning_tokens=thoughts,
    )


def usage_to_wire(usage: ir.Usage) -> dict[str, Any]:
    """IR usage -> usageMetadata.  Gemini has no cache-write count: written
    tokens are reported as ordinary prompt tokens."""
    prompt = usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens
    thoughts = min(usage.reasoning_tokens, usage.output_tokens)
    out: dict[str, Any] = {"promptTokenCount": prompt, "candidatesTokenCount": usage.output_tokens - thoughts}
    if usage.cache_read_tokens:
        out["cachedContentTokenCount"] = usage.cache_read_tokens
    if thoughts:
        out["thoughtsTokenCount"] = thoughts
    out["totalTokenCount"] = prompt + usage.output_tokens
    return out


# ---------------------------------------------------------------- finish reasons

_FILTER_REASONS = frozenset({
    "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION",
})


def stop_from_wire(reason: str, saw_tool_call: bool) -> ir.StopReason:
    """finishReason -> IR (protocols.md 5.7).  A completed function-calling turn
    says STOP, so tool calls in the message decide TOOL_USE."""
    if reason == "MAX_TOKENS":
        return ir.StopReason.MAX_TOKENS
    if reason in _FILTER_REASONS:
        return ir.StopReason.CONTENT_FILTER
    # STOP, LANGUAGE, OTHER, NO_IMAGE, IMAGE_OTHER, MALFORMED_FUNCTION_CALL, ...:
    # the Anthropic column of 5.7 says end_turn
    return ir.StopReason.TOOL_USE if saw_tool_call else ir.StopReason.END_TURN


def stop_to_wire(stop: ir.StopReason) -> str:
    if stop in (ir.StopReason.MAX_TOKENS, ir.StopReason.CONTEXT_LIMIT):
        return "MAX_TOKENS"
    if stop is ir.StopReason.CONTENT_FILTER:
        return "SAFETY"
    if stop is ir.StopReason.ERROR:
        return "OTHER"
    return "STOP"


# ---------------------------------------------------------------- errors

STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    402: "FAILED_PRECONDITION",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def status_name(code: int) -> str:
    name = STATUS_NAMES.get(code)
    if name:
        return name
    return "INVALID_ARGUMENT" if 400 <= code < 500 else "INTERNAL"


def kind_for_code(code: int) -> str:
    """An in-stream ``{"error": {"code": ...}}`` -> a ProxyError kind."""
    from cheapproxy.errors import kind_for_upstream_status

    return kind_for_upstream_status(code) if code >= 400 else "upstream_failed"
