"""Client side: an Anthropic Messages request body -> ir.Request.

Malformed input raises ProxyError("invalid_request", ..., param=<json path>).
Block types and tools with no IR equivalent (server tools and their result
blocks, ``search_result``, content-source documents) are dropped: they only
matter on a same-protocol relay, which never decodes the body.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from cheapproxy import ir

from .common import NAME, WIRE_EFFORTS, invalid, signature_from_wire

# top-level keys mapped into IR fields; everything else is kept in provider_data
_MAPPED = frozenset({
    "model", "messages", "system", "max_tokens", "stop_sequences", "temperature", "top_p", "top_k",
    "tools", "tool_choice", "thinking", "output_config", "stream",
})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _extras(block: dict[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    """provider_data for a block: its keys other than ``known`` (cache_control,
    citations ...), namespaced by protocol."""
    extra = {k: v for k, v in block.items() if k not in known}
    return {NAME: extra} if extra else {}


def _text_part(block: dict[str, Any], path: str) -> ir.TextPart:
    text = block.get("text")
    if not isinstance(text, str):
        raise invalid(f"{path}.text must be a string", f"{path}.text")
    return ir.TextPart(text=text, provider_data=_extras(block, ("type", "text")))


def _image_part(block: dict[str, Any], path: str) -> ir.Part:
    src = block.get("source")
    if not isinstance(src, dict):
        raise invalid(f"{path}.source must be an object", f"{path}.source")
    pd = _extras(block, ("type", "source"))
    stype = src.get("type")
    if stype == "base64":
        media, data = src.get("media_type"), src.get("data")
        if not isinstance(media, str) or not isinstance(data, str):
            raise invalid(f"{path}.source needs media_type and data strings", f"{path}.source")
        return ir.ImagePart(media_type=media, data=data, provider_data=pd)
    if stype == "url":
        url = src.get("url")
        if not isinstance(url, str) or not url:
            raise invalid(f"{path}.source.url must be a string", f"{path}.source.url")
        return ir.ImagePart(url=url, provider_data=pd)
    if stype == "file":
        fid = src.get("file_id")
        if not isinstance(fid, str):
            raise invalid(f"{path}.source.file_id must be a string", f"{path}.source.file_id")
        pd.setdefault(NAME, {})["block_type"] = "image"
        return ir.FilePart(file_id=fid, provider_data=pd)
    raise invalid(f"{path}.source.type {stype!r} is not supported", f"{path}.source.type")


def _document_part(block: dict[str, Any], path: str) -> ir.FilePart | None:
    src = block.get("source")
    if not isinstance(src, dict):
        raise invalid(f"{path}.source must be an object", f"{path}.source")
    title = block.get("title") if isinstance(block.get("title"), str) else None
    pd = _extras(block, ("type", "source"))
    stype = src.get("type")
    if stype == "base64":
        media, data = src.get("media_type"), src.get("data")
        if not isinstance(media, str) or not isinstance(data, str):
            raise invalid(f"{path}.source needs media_type and data strings", f"{path}.source")
        return ir.FilePart(media_type=media, data=data, filename=title, provider_data=pd)
    if stype == "text":
        data = src.get("data")
        if not isinstance(data, str):
            raise invalid(f"{path}.source.data must be a string", f"{path}.source.data")
        b64 = base64.b64encode(data.encode()).decode()
        return ir.FilePart(media_type=src.get("media_type") or "text/plain", data=b64, filename=title, provider_data=pd)
    if stype == "url":
        url = src.get("url")
        if not isinstance(url, str) or not url:
            raise invalid(f"{path}.source.url must be a string", f"{path}.source.url")
        return ir.FilePart(url=url, media_type="application/pdf", filename=title, provider_data=pd)
    if stype == "file":
        fid = src.get("file_id")
        if not isinstance(fid, str):
            raise invalid(f"{path}.source.file_id must be a string", f"{path}.source.file_id")
        pd.setdefault(NAME, {})["block_type"] = "document"
        return ir.FilePart(file_id=fid, filename=title, provider_data=pd)
    return None  # "content" sources: no IR equivalent


def _result_content(content: Any, path: str) -> list[ir.Part]:
    if content is None:
        return []
    if isinstance(content, str):
        return [ir.TextPart(text=content)] if content else []
    if not isinstance(content, list):
        raise invalid(f"{path} must be a string or a list of blocks", path)
    parts: list[ir.Part] = []
    for i, b in enumerate(content):
        p = f"{path}.{i}"
        if not isinstance(b, dict):
            raise invalid(f"{p} must be an object", p)
        t = b.get("type")
        if t == "text":
            parts.append(_text_part(b, p))
        elif t == "image":
            parts.append(_image_part(b, p))
        elif t == "document":
            doc = _document_part(b, p)
            if doc is not None:
                parts.append(doc)
    return parts


class _Decoder:
    """Per-request state: tool_use id -> name, so results get their names."""

    def __init__(self) -> None:
        self.tool_names: dict[str, str] = {}

    def block(self, b: Any, path: str, role: str) -> ir.Part | None:
        if not isinstance(b, dict):
            raise invalid(f"{path} must be an object", path)
        t = b.get("type")
        if not isinstance(t, str):
            raise invalid(f"{path}.type must be a string", f"{path}.type")
        if t == "text":
            return _text_part(b, path)
        if role == "system":
            raise invalid(f"{path}: system messages may only contain text blocks", f"{path}.type")
        if t == "image":
            return _image_part(b, path)
        if t == "document":
            return _document_part(b, path)
        if t == "tool_use":
            tid, name, args = b.get("id"), b.get("name"), b.get("input", {})
            if not isinstance(tid, str) or not tid or not isinstance(name, str) or not name:
                raise invalid(f"{path} needs string id and name", path)
            if not isinstance(args, dict):
                raise invalid(f"{path}.input must be an object", f"{path}.input")
            self.tool_names[tid] = name
            return ir.ToolCallPart(id=tid, name=name, arguments=orjson.dumps(args).decode(),
                                   provider_data=_extras(b, ("type", "id", "name", "input")))
        if t == "tool_result":
            tid = b.get("tool_use_id")
            if not isinstance(tid, str) or not tid:
                raise invalid(f"{path}.tool_use_id must be a string", f"{path}.tool_use_id")
            is_error = b.get("is_error", False)
            if not isinstance(is_error, bool):
                raise invalid(f"{path}.is_error must be a boolean", f"{path}.is_error")
            return ir.ToolResultPart(
                tool_call_id=tid, name=self.tool_names.get(tid), is_error=is_error,
                content=_result_content(b.get("content"), f"{path}.content"),
                provider_data=_extras(b, ("type", "tool_use_id", "content", "is_error")),
            )
        if t == "thinking":
            text = b.get("thinking", "")
            if not isinstance(text, str):
                raise invalid(f"{path}.thinking must be a string", f"{path}.thinking")
            sig, proto = signature_from_wire(b.get("signature"))
            return ir.ReasoningPart(text=text, signature=sig, signature_protocol=proto)
        if t == "redacted_thinking":
            data = b.get("data")
            if not isinstance(data, str):
                raise invalid(f"{path}.data must be a string", f"{path}.data")
            return ir.ReasoningPart(redacted=data, signature_protocol=NAME)
        return None  # server tool blocks, search results ...: no IR equivalent

    def message(self, m: Any, path: str) -> ir.Message:
        if not isinstance(m, dict):
            raise invalid(f"{path} must be an object", path)
        role = m.get("role")
        if role not in ("user", "assistant", "system"):
            raise invalid(f"{path}.role must be user, assistant or system", f"{path}.role")
        content = m.get("content")
        parts: list[ir.Part] = []
        if isinstance(content, str):
            if content:
                parts.append(ir.TextPart(text=content))
        elif isinstance(content, list):
            for i, b in enumerate(content):
                p = self.block(b, f"{path}.content.{i}", role)
                if p is not None:
                    parts.append(p)
        else:
            raise invalid(f"{path}.content must be a string or a list of blocks", f"{path}.content")
        return ir.Message(role=role, content=parts)


def _system(value: Any) -> list[ir.TextPart]:
    if value is None:
        return []
    if isinstance(value, str):
        return [ir.TextPart(text=value)] if value else []
    if not isinstance(value, list):
        raise invalid("system must be a string or a list of text blocks", "system")
    out = []
    for i, b in enumerate(value):
        if not isinstance(b, dict) or b.get("type") != "text":
            raise invalid(f"system.{i} must be a text block", f"system.{i}")
        out.append(_text_part(b, f"system.{i}"))
    return out


def _tools(value: Any) -> list[ir.Tool]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("tools must be a list", "tools")
    out = []
    for i, t in enumerate(value):
        p = f"tools.{i}"
        if not isinstance(t, dict):
            raise invalid(f"{p} must be an object", p)
        if t.get("type") not in (None, "custom"):
            continue  # server / versioned tools (web_search_..., bash_...): no IR equivalent
        name, schema, desc = t.get("name"), t.get("input_schema"), t.get("description")
        if not isinstance(name, str) or not name:
            raise invalid(f"{p}.name must be a string", f"{p}.name")
        if not isinstance(schema, dict):
            raise invalid(f"{p}.input_schema must be an object", f"{p}.input_schema")
        if desc is not None and not isinstance(desc, str):
            raise invalid(f"{p}.description must be a string", f"{p}.description")
        strict = t.get("strict")
        out.append(ir.Tool(
            name=name, description=desc, parameters=schema,
            strict=strict if isinstance(strict, bool) else None,
            provider_data=_extras(t, ("type", "name", "description", "input_schema", "strict")),
        ))
    return out


def _tool_choice(value: Any) -> ir.ToolChoice | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid("tool_choice must be an object", "tool_choice")
    t = value.get("type")
    mode = {"auto": "auto", "any": "required", "tool": "tool", "none": "none"}.get(t) if isinstance(t, str) else None
    if mode is None:
        raise invalid("tool_choice.type must be auto, any, tool or none", "tool_choice.type")
    name = value.get("name")
    if mode == "tool" and (not isinstance(name, str) or not name):
        raise invalid("tool_choice.name is required with type tool", "tool_choice.name")
    parallel = False if value.get("disable_parallel_tool_use") is True else None
    return ir.ToolChoice(mode=mode, name=name if mode == "tool" else None, parallel=parallel)


def _reasoning(thinking: Any, output_config: dict[str, Any]) -> ir.Reasoning | None:
    effort = output_config.get("effort")
    if effort is not None and effort not in WIRE_EFFORTS:
        raise invalid(f"output_config.effort must be one of {', '.join(WIRE_EFFORTS)}", "output_config.effort")
    if thinking is None:
        return ir.Reasoning(enabled=True, effort=effort) if effort else None
    if not isinstance(thinking, dict):
        raise invalid("thinking must be an object", "thinking")
    t = thinking.get("type")
    include = thinking.get("display") != "omitted"
    if t == "disabled":
        return ir.Reasoning(enabled=False)
    if t == "enabled":
        budget = thinking.get("budget_tokens")
        if not _is_int(budget) or budget < 1:
            raise invalid("thinking.budget_tokens must be a positive integer", "thinking.budget_tokens")
        return ir.Reasoning(enabled=True, budget_tokens=budget, effort=effort, include_thoughts=include)
    if not isinstance(t, str):
        raise invalid("thinking.type must be a string", "thinking.type")
    # "adaptive" and newer model-driven modes: the model decides how much to think
    return ir.Reasoning(enabled=True, adaptive=True, effort=effort, include_thoughts=include)


def decode_request(body: dict[str, Any], *, operation: str = "chat") -> ir.Request:
    """Anthropic request body -> IR.  ``max_tokens`` is required for ``chat``."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model is required", "model")
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        raise invalid("messages is required and must be a list", "messages")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        if operation == "chat":
            raise invalid("max_tokens is required", "max_tokens")
    elif not _is_int(max_tokens) or max_tokens < 0:
        raise invalid("max_tokens must be a non-negative integer", "max_tokens")
    dec = _Decoder()
    messages = [dec.message(m, f"messages.{i}") for i, m in enumerate(msgs)]
    stop = body.get("stop_sequences")
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise invalid("stop_sequences must be a list of strings", "stop_sequences")
    for key in ("temperature", "top_p"):
        if body.get(key) is not None and not _is_num(body[key]):
            raise invalid(f"{key} must be a number", key)
    top_k = body.get("top_k")
    if top_k is not None and not _is_int(top_k):
        raise invalid("top_k must be an integer", "top_k")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream must be a boolean", "stream")
    oc = body.get("output_config") or {}
    if not isinstance(oc, dict):
        raise invalid("output_config must be an object", "output_config")
    fmt = oc.get("format")
    response_format = None
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise invalid("output_config.format must be {type: json_schema, schema: {...}}", "output_config.format")
        response_format = ir.ResponseFormat(type="json_schema", schema=fmt["schema"])
    meta = body.get("metadata")
    user = meta.get("user_id") if isinstance(meta, dict) and isinstance(meta.get("user_id"), str) else None
    extras = {k: v for k, v in body.items() if k not in _MAPPED}
    return ir.Request(
        model=model,
        messages=messages,
        system=_system(body.get("system")),
        tools=_tools(body.get("tools")),
        tool_choice=_tool_choice(body.get("tool_choice")),
        max_tokens=max_tokens,
        temperature=body.get("temperature"),
        top_p=body.get("top_p"),
        top_k=top_k,
        stop=list(stop or []),
        stream=stream if operation == "chat" else False,
        reasoning=_reasoning(body.get("thinking"), oc),
        response_format=response_format,
        user=user,
        provider_data={NAME: extras} if extras else {},
    )
