"""Pieces shared by the request, response and stream halves of the
``openai-responses`` codec: usage and stop-reason mapping, output item
builders, namespace-tool names, data URLs and reasoning continuity tokens."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.errors import ProxyError

PROTOCOL = "openai-responses"

# Codex groups MCP tools as {"type":"namespace","name":"mcp__server__","tools":[...]}.
# IR tools are flat, so a nested tool becomes "<namespace><name>" when the
# namespace already ends with "__" (Codex's convention, giving the classic
# mcp__server__tool name) and "<namespace>__<name>" otherwise.  The pair is kept
# in Tool.provider_data so the client encoder can answer {namespace, name}.
NAMESPACE_SEP = "__"

# Reasoning continuity tokens of *other* protocols (an Anthropic thinking
# signature, say) ride inside encrypted_content so that Codex sends them back
# on the next turn; the prefix marks them as ours to unwrap.
FOREIGN_SIGNATURE_PREFIX = "cpx1:"


def flat_tool_name(namespace: str | None, name: str) -> str:
    """The IR name of a (possibly namespaced) Responses tool."""
    if not namespace:
        return name
    if namespace.endswith(NAMESPACE_SEP):
        return namespace + name
    return namespace + NAMESPACE_SEP + name


def tool_wire_names(tool: ir.Tool | None, ir_name: str) -> tuple[str, str | None]:
    """(name, namespace) to put on a Responses call item for IR tool ``ir_name``."""
    if tool is not None:
        pd = tool.provider_data.get(PROTOCOL) or {}
        if pd.get("namespace"):
            return str(pd.get("name") or ir_name), str(pd["namespace"])
    return ir_name, None


# ---------------------------------------------------------------- usage


def usage_from_wire(u: Any) -> ir.Usage | None:
    """Responses usage (input includes cached tokens) -> IR (uncached input)."""
    if not isinstance(u, dict):
        return None
    details = u.get("input_tokens_details") or {}
    out_details = u.get("output_tokens_details") or {}
    total_in = _int(u.get("input_tokens"))
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    written = _int(details.get("cache_write_tokens")) if isinstance(details, dict) else 0
    reasoning = _int(out_details.get("reasoning_tokens")) if isinstance(out_details, dict) else 0
    return ir.Usage(
        input_tokens=max(total_in - cached - written, 0),
        output_tokens=_int(u.get("output_tokens")),
        cache_read_tokens=cached,
        cache_write_tokens=written,
        reasoning_tokens=reasoning,
    )


def usage_to_wire(u: ir.Usage | None) -> dict[str, Any]:
    """IR usage -> Responses usage object (protocols.md 5.8)."""
    u = u or ir.Usage()
    total_in = u.input_tokens + u.cache_read_tokens + u.cache_write_tokens
    details: dict[str, int] = {"cached_tokens": u.cache_read_tokens}
    if u.cache_write_tokens:
        details["cache_write_tokens"] = u.cache_write_tokens
    return {
        "input_tokens": total_in,
        "input_tokens_details": details,
        "output_tokens": u.output_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": total_in + u.output_tokens,
    }


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


# ---------------------------------------------------------------- stop reasons


def stop_from_wire(status: Any, incomplete: Any, has_tool_calls: bool) -> ir.StopReason:
    """Responses terminal status -> IR stop reason (protocols.md 5.7)."""
    if status == "incomplete":
        reason = incomplete.get("reason") if isinstance(incomplete, dict) else None
        return ir.StopReason.CONTENT_FILTER if reason == "content_filter" else ir.StopReason.MAX_TOKENS
    if status in ("failed", "cancelled"):
        return ir.StopReason.ERROR
    return ir.StopReason.TOOL_USE if has_tool_calls else ir.StopReason.END_TURN


def status_for_stop(stop: ir.StopReason) -> tuple[str, dict[str, str] | None]:
    """IR stop reason -> (Responses status, incomplete_details)."""
    if stop in (ir.StopReason.MAX_TOKENS, ir.StopReason.CONTEXT_LIMIT):
        return "incomplete", {"reason": "max_output_tokens"}
    if stop is ir.StopReason.CONTENT_FILTER:
        return "incomplete", {"reason": "content_filter"}
    if stop is ir.StopReason.ERROR:
        return "failed", None
    return "completed", None


# ---------------------------------------------------------------- reasoning tokens


def wrap_signature(part: ir.ReasoningPart) -> str | None:
    """The encrypted_content to show a client for a reasoning part, or None."""
    if part.signature and part.signature_protocol == PROTOCOL:
        return part.signature
    if (part.signature and part.signature_protocol) or part.redacted:
        blob = orjson.dumps({"p": part.signature_protocol, "s": part.signature, "r": part.redacted})
        return FOREIGN_SIGNATURE_PREFIX + base64.urlsafe_b64encode(blob).decode()
    return None


def unwrap_signature(enc: str) -> tuple[str | None, str | None, str | None]:
    """encrypted_content -> (signature, signature_protocol, redacted)."""
    if enc.startswith(FOREIGN_SIGNATURE_PREFIX):
        try:
            obj = orjson.loads(base64.urlsafe_b64decode(enc[len(FOREIGN_SIGNATURE_PREFIX):]))
        except (ValueError, binascii.Error, orjson.JSONDecodeError):
            return enc, PROTOCOL, None
        if isinstance(obj, dict):
            return obj.get("s"), obj.get("p"), obj.get("r")
    return enc, PROTOCOL, None


def summary_texts(item: dict[str, Any]) -> list[str]:
    """Visible text of a reasoning item: its summary, else its raw content."""
    texts = [s.get("text", "") for s in item.get("summary") or [] if isinstance(s, dict)]
    if not any(texts):
        texts = [c.get("text", "") for c in item.get("content") or [] if isinstance(c, dict)]
    return [t for t in texts if isinstance(t, str) and t]


# ---------------------------------------------------------------- custom tools


def unwrap_custom_input(arguments: str) -> str:
    """A custom tool call that went through a protocol without freeform tools
    comes back as ``{"input": "<raw>"}`` JSON; recover the raw text."""
    try:
        obj = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return arguments
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        v = obj.get("input")
        if isinstance(v, str):
            return v
        if len(obj) == 1:
            (only,) = obj.values()
            if isinstance(only, str):
                return only
    return arguments


class CallStyle:
    """How a tool call is shown to a Responses client: a function_call or a
    custom_tool_call (unwrapping ``{"input":...}`` when it came back as a
    function), with the namespace split back out."""

    __slots__ = ("custom", "unwrap", "name", "namespace")

    def __init__(self, part: ir.ToolCallPart, tools: dict[str, ir.Tool]) -> None:
        tool = tools.get(part.name)
        self.custom = part.kind == "custom" or (tool is not None and tool.kind == "custom")
        self.unwrap = self.custom and part.kind != "custom"
        self.name, self.namespace = tool_wire_names(tool, part.name)

    def call_item(self, item_id: str, call_id: str, args: str, status: str) -> dict[str, Any]:
        if self.custom:
            item: dict[str, Any] = {"id": item_id, "type": "custom_tool_call", "status": status,
                                    "call_id": call_id, "name": self.name, "input": args}
        else:
            item = {"id": item_id, "type": "function_call", "status": status,
                    "call_id": call_id, "name": self.name, "arguments": args}
        if self.namespace:
            item["namespace"] = self.namespace
        return item


def tools_by_name(request: ir.Request | None) -> dict[str, ir.Tool]:
    return {t.name: t for t in request.tools} if request is not None else {}


# ---------------------------------------------------------------- output items


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [output_text(text)] if status == "completed" else []}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def reasoning_item(item_id: str, text: str, encrypted: str | None) -> dict[str, Any]:
    item: dict[str, Any] = {"id": item_id, "type": "reasoning",
                            "summary": [{"type": "summary_text", "text": text}] if text else []}
    if encrypted is not None:
        item["encrypted_content"] = encrypted
    return item


def response_id(request_id: str) -> str:
    return "resp_" + ("".join(ch for ch in request_id if ch.isalnum()) or "0")


def envelope(ctx_model: str, resp_id: str, created: int, request: ir.Request | None, status: str) -> dict[str, Any]:
    """The Response object fields every snapshot carries (output/usage set by caller)."""
    req = request
    reasoning = None
    if req is not None and req.reasoning is not None and req.reasoning.enabled:
        reasoning = {"effort": req.reasoning.effort, "summary": "auto" if req.reasoning.include_thoughts else None}
    fmt: dict[str, Any] = {"type": "text"}
    if req is not None and req.response_format is not None and req.response_format.type != "text":
        rf = req.response_format
        fmt = {"type": rf.type}
        if rf.type == "json_schema":
            fmt.update(name=rf.name or "response", schema=rf.schema or {}, strict=rf.strict)
    return {
        "id": resp_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": req.max_tokens if req is not None else None,
        "model": ctx_model,
        "output": [],
        "parallel_tool_calls": not (req is not None and req.tool_choice is not None and req.tool_choice.parallel is False),
        "previous_response_id": None,
        "reasoning": reasoning,
        "store": False,
        "temperature": req.temperature if req is not None else None,
        "text": {"format": fmt},
        "tool_choice": "auto",
        "tools": [],
        "top_p": req.top_p if req is not None else None,
        "truncation": "disabled",
        "usage": None,
        "metadata": {},
    }


# ---------------------------------------------------------------- data URLs


def parse_data_url(url: str, param: str) -> tuple[str, str]:
    """``data:<type>;base64,<b64>`` -> (media type, base64 data)."""
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise ProxyError("invalid_request", f"{param} must be a base64 data URL or an http(s) URL", param=param)
    media_type = head[5:-7] or "application/octet-stream"
    return media_type, data


def data_url(media_type: str | None, data: str) -> str:
    return f"data:{media_type or 'application/octet-stream'};base64,{data}"


def error_type_for(status: int) -> str:
    """OpenAI error ``type`` for an HTTP status (cross-codec table)."""
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        402: "insufficient_quota",
        403: "permission_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "service_unavailable",
        504: "timeout",
    }.get(status, "server_error" if status >= 500 else "invalid_request_error")
