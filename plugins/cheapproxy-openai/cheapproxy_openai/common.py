"""Mappings shared by both sides of the ``openai-chat`` codec: stop reasons,
usage, error shapes, ids and small body helpers."""

from __future__ import annotations

import re
from random import getrandbits as _getrandbits
from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.errors import ProxyError

NAME = "openai-chat"

# ---------------------------------------------------------------- stop reasons

_FINISH_TO_IR = {
    "stop": ir.StopReason.END_TURN,
    "length": ir.StopReason.MAX_TOKENS,
    "tool_calls": ir.StopReason.TOOL_USE,
    "function_call": ir.StopReason.TOOL_USE,
    "content_filter": ir.StopReason.CONTENT_FILTER,
}

_IR_TO_FINISH = {
    ir.StopReason.END_TURN: "stop",
    ir.StopReason.STOP_SEQUENCE: "stop",
    ir.StopReason.PAUSE: "stop",  # no equivalent; the answer simply ends here
    ir.StopReason.MAX_TOKENS: "length",
    ir.StopReason.CONTEXT_LIMIT: "length",
    ir.StopReason.TOOL_USE: "tool_calls",
    ir.StopReason.CONTENT_FILTER: "content_filter",
    ir.StopReason.ERROR: "stop",
}


def stop_from_finish(finish: str | None, has_tool_calls: bool) -> ir.StopReason:
    """Wire ``finish_reason`` -> IR; a message with tool calls is TOOL_USE unless cut by length."""
    stop = _FINISH_TO_IR.get(finish or "", ir.StopReason.END_TURN)
    if has_tool_calls and stop is ir.StopReason.END_TURN:
        return ir.StopReason.TOOL_USE
    return stop


def finish_from_stop(stop: ir.StopReason, has_tool_calls: bool, legacy: bool = False) -> str:
    """IR stop reason -> wire ``finish_reason`` (``function_call`` for legacy clients)."""
    finish = _IR_TO_FINISH.get(stop, "stop")
    if has_tool_calls and finish == "stop":
        finish = "tool_calls"
    if legacy and finish == "tool_calls":
        return "function_call"
    return finish


# ---------------------------------------------------------------- usage


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_from_wire(u: Any) -> ir.Usage | None:
    """OpenAI usage object -> IR (``input_tokens`` excludes cached and cache-write tokens)."""
    if not isinstance(u, dict):
        return None
    prompt = _int(u.get("prompt_tokens"))
    completion = _int(u.get("completion_tokens"))
    pd = u.get("prompt_tokens_details")
    cd = u.get("completion_tokens_details")
    cached = _int(pd.get("cached_tokens")) if isinstance(pd, dict) else 0
    write = _int(pd.get("cache_write_tokens")) if isinstance(pd, dict) else 0
    if not cached:
        # DeepSeek reports its cache hits at the top level
        cached = _int(u.get("prompt_cache_hit_tokens"))
    reasoning = _int(cd.get("reasoning_tokens")) if isinstance(cd, dict) else 0
    return ir.Usage(
        input_tokens=max(prompt - cached - write, 0),
        output_tokens=completion,
        cache_read_tokens=cached,
        cache_write_tokens=write,
        reasoning_tokens=reasoning,
    )


def usage_to_wire(u: ir.Usage) -> dict[str, Any]:
    """IR usage -> OpenAI usage object (``prompt_tokens`` includes cache reads and writes)."""
    prompt = u.input_tokens + u.cache_read_tokens + u.cache_write_tokens
    details: dict[str, Any] = {"cached_tokens": u.cache_read_tokens}
    if u.cache_write_tokens:
        details["cache_write_tokens"] = u.cache_write_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": u.output_tokens,
        "total_tokens": prompt + u.output_tokens,
        "prompt_tokens_details": details,
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    }


# ---------------------------------------------------------------- errors

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout",
}

_CODE_BY_STATUS = {
    401: "invalid_api_key",
    402: "insufficient_quota",
    413: "request_too_large",
    429: "rate_limit_exceeded",
}


def error_status(err: ProxyError) -> int:
    # OpenAI clients know 503 as "overloaded"; 529 is Anthropic's private status
    return 503 if err.kind == "upstream_overloaded" else err.status


def error_object(err: ProxyError) -> dict[str, Any]:
    """The ``{"error": {...}}`` object for ``err``."""
    status = error_status(err)
    etype = _TYPE_BY_STATUS.get(status)
    if etype is None:
        etype = "server_error" if status >= 500 else "invalid_request_error"
    code = err.code or _CODE_BY_STATUS.get(status)
    if code is None and status == 404 and (err.param == "model" or "model" in err.message.lower()):
        code = "model_not_found"
    return {"error": {"message": err.message, "type": etype, "param": err.param, "code": code}}


# an upstream 401 echoes a masked key ("sk-abc***xyz"); never relay even that
_SECRET_RE = re.compile(r"(sk-[A-Za-z0-9_\-*]{4,}|Bearer\s+\S+)")


def scrub(message: str) -> str:
    return _SECRET_RE.sub("[redacted]", message)


def message_from_error_body(body: bytes) -> str | None:
    """The human message of an OpenAI-style error body, or None."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]  # some OpenAI-compatible servers wrap errors in a list
    if not isinstance(data, dict):
        return None
    err = data.get("error", data)
    if isinstance(err, dict):
        msg = err.get("message")
        if isinstance(msg, str) and msg:
            return scrub(msg)
    if isinstance(err, str) and err:
        return scrub(err)
    return None


# ---------------------------------------------------------------- misc


def new_call_id() -> str:
    # "call_" + 24 hex digits.  An id names a tool call and guards nothing, so
    # the random module's generator (reseeded in forked workers) will do: no
    # getrandom syscall per id as with the secrets module.
    return "call_%024x" % _getrandbits(96)


def reasoning_text(delta: dict[str, Any]) -> str | None:
    """Visible reasoning of a delta or message: DeepSeek ``reasoning_content``
    or the ``reasoning`` string some OpenAI-compatible servers use."""
    text = delta.get("reasoning_content")
    if isinstance(text, str):
        return text
    text = delta.get("reasoning")
    return text if isinstance(text, str) else None


def bad(message: str, param: str | None = None) -> ProxyError:
    return ProxyError("invalid_request", message, param=param)


def bad_upstream(message: str) -> ProxyError:
    return ProxyError("upstream_failed", message)
