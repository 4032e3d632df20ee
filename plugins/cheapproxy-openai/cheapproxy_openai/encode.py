"""Non-streamed bodies: ir.Request -> upstream wire body, upstream wire
response -> ir.Response, and ir.Response -> client wire response."""

from __future__ import annotations

from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.protocol import EncodeContext

from .common import (
    NAME,
    bad,
    bad_upstream,
    finish_from_stop,
    new_call_id,
    reasoning_text,
    stop_from_finish,
    usage_from_wire,
    usage_to_wire,
)

# effort -> budget defaults shared by all codecs; budget -> effort picks the
# largest effort whose budget does not exceed the given one
_EFFORT_BUDGETS = (("low", 1024), ("medium", 4096), ("high", 16384), ("xhigh", 32768), ("max", 64000))

CUSTOM_TOOL_PARAMETERS = {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}


def effort_for_budget(budget: int) -> str:
    effort = "minimal"
    for name, threshold in _EFFORT_BUDGETS:
        if budget >= threshold:
            effort = name
    return effort


# ---------------------------------------------------------------- upstream request


def _data_url(media_type: str | None, data: str) -> str:
    return f"data:{media_type or 'application/octet-stream'};base64,{data}"


def _image(p: ir.ImagePart, param: str) -> dict[str, Any]:
    if p.data is not None:
        url = _data_url(p.media_type or "image/png", p.data)
    elif p.url is not None:
        url = p.url
    else:
        raise bad("an image needs data or a url", param)
    img: dict[str, Any] = {"url": url}
    if p.detail:
        img["detail"] = p.detail
    return {"type": "image_url", "image_url": img}


def _file(p: ir.FilePart, param: str) -> dict[str, Any]:
    media = p.media_type or ""
    if media.startswith("audio/") and p.data is not None:
        fmt = media[6:]
        return {"type": "input_audio", "input_audio": {"data": p.data, "format": "mp3" if fmt == "mpeg" else fmt}}
    f: dict[str, Any] = {}
    if p.data is not None:
        f["file_data"] = _data_url(p.media_type or "application/pdf", p.data)
    elif p.file_id is not None:
        f["file_id"] = p.file_id
    else:
        raise bad("file URLs are not supported by openai-chat", param)
    if p.filename:
        f["filename"] = p.filename
    elif "file_data" in f:
        f["filename"] = "document.pdf" if media in ("", "application/pdf") else "document"
    return {"type": "file", "file": f}


def _user_parts(parts: list[ir.Part], param: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in parts:
        if isinstance(p, ir.TextPart):
            out.append({"type": "text", "text": p.text})
        elif isinstance(p, ir.ImagePart):
            out.append(_image(p, param))
        elif isinstance(p, ir.FilePart):
            out.append(_file(p, param))
        # reasoning or tool calls cannot appear in a user turn; nothing to send
    return out


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def _tool_result(p: ir.ToolResultPart, param: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A ``tool`` message, plus media parts that must travel in a user message
    (tool messages accept text only)."""
    texts, media = [], []
    for c in p.content:
        if isinstance(c, ir.TextPart):
            texts.append(c.text)
        elif isinstance(c, (ir.ImagePart, ir.FilePart)):
            media.extend(_user_parts([c], param))
    text = "".join(texts)
    if p.is_error:  # Chat has no error flag: say it in the content
        text = f"Error: {text}" if text else "Error"
    return {"role": "tool", "tool_call_id": p.tool_call_id, "content": text}, media


def _assistant(m: ir.Message) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for p in m.content:
        if isinstance(p, ir.TextPart):
            texts.append(p.text)
        elif isinstance(p, ir.ToolCallPart):
            args = p.arguments
            if p.kind == "custom":  # sent as a function tool with one string parameter
                args = orjson.dumps({"input": p.arguments}).decode()
            calls.append({"id": p.id, "type": "function", "function": {"name": p.name, "arguments": args or "{}"}})
        # reasoning from history is dropped: Chat has no way to send it back
    text = "".join(texts)
    msg: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _messages(req: ir.Request) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.system:
        dev = any(p.provider_data.get(NAME, {}).get("role") == "developer" for p in req.system)
        role = "developer" if dev else "system"
        out.append({"role": role, "content": "\n\n".join(p.text for p in req.system)})
    for i, m in enumerate(req.messages):
        param = f"messages[{i}]"
        if m.role == "system":
            text = "\n\n".join(p.text for p in m.content if isinstance(p, ir.TextPart))
            dev = any(p.provider_data.get(NAME, {}).get("role") == "developer" for p in m.content)
            out.append({"role": "developer" if dev else "system", "content": text})
        elif m.role == "assistant":
            out.append(_assistant(m))
        else:
            # tool results first (right after the assistant's calls), then user content
            rest: list[ir.Part] = []
            moved: list[dict[str, Any]] = []
            for p in m.content:
                if isinstance(p, ir.ToolResultPart):
                    tool_msg, media = _tool_result(p, param)
                    out.append(tool_msg)
                    moved.extend(media)
                else:
                    rest.append(p)
            parts = moved + _user_parts(rest, param)
            if parts:
                out.append({"role": "user", "content": _content(parts)})
    return out


def _tools(req: ir.Request) -> list[dict[str, Any]]:
    tools = []
    for t in req.tools:
        if t.kind == "custom":
            fn: dict[str, Any] = {"name": t.name, "parameters": CUSTOM_TOOL_PARAMETERS}
        else:
            fn = {"name": t.name, "parameters": t.parameters}
            if t.strict is not None:
                fn["strict"] = t.strict
        if t.description:
            fn["description"] = t.description
        tools.append({"type": "function", "function": fn})
    return tools


def encode_request(req: ir.Request, upstream_model: str, stream: bool) -> dict[str, Any]:
    """IR -> Chat Completions request body."""
    body: dict[str, Any] = {"model": upstream_model, "messages": _messages(req)}
    if req.tools:
        body["tools"] = _tools(req)
        tc = req.tool_choice
        if tc is not None:
            if tc.mode == "tool":
                body["tool_choice"] = {"type": "function", "function": {"name": tc.name}}
            else:
                body["tool_choice"] = tc.mode
            if tc.parallel is not None:
                body["parallel_tool_calls"] = tc.parallel
    elif req.tool_choice is not None and req.tool_choice.mode == "none":
        pass  # "none" without tools is the default; sending it without tools is an error
    if req.max_tokens is not None:
        body["max_completion_tokens"] = req.max_tokens
    if req.temperature is not None:
        body["temperature"] = req.temperature
    if req.top_p is not None:
        body["top_p"] = req.top_p
    if req.stop:
        if len(req.stop) > 4:
            raise bad("more than 4 stop sequences are not supported by openai-chat", "stop")
        body["stop"] = req.stop
    if req.n is not None and req.n > 1:
        body["n"] = req.n
    if req.seed is not None:
        body["seed"] = req.seed
    if req.user and len(req.user) <= 64:
        body["user"] = req.user
    r = req.reasoning
    if r is not None:
        if r.effort and (r.enabled or r.effort == "none"):
            body["reasoning_effort"] = r.effort
        elif r.enabled and r.budget_tokens:
            body["reasoning_effort"] = effort_for_budget(r.budget_tokens)
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif rf is not None and rf.type == "json_schema":
        js: dict[str, Any] = {"name": rf.name or "response", "schema": rf.schema or {"type": "object"}}
        if rf.strict is not None:
            js["strict"] = rf.strict
        body["response_format"] = {"type": "json_schema", "json_schema": js}
    extra = req.provider_data.get(NAME, {}).get("extra")
    if isinstance(extra, dict):
        for k, v in extra.items():
            body.setdefault(k, v)
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}  # billing needs usage
    return body


# ---------------------------------------------------------------- upstream response


def _tool_call(tc: Any) -> ir.ToolCallPart | None:
    if not isinstance(tc, dict):
        return None
    call_id = tc.get("id") if isinstance(tc.get("id"), str) and tc.get("id") else new_call_id()
    if tc.get("type") == "custom" and isinstance(tc.get("custom"), dict):
        cu = tc["custom"]
        name, raw = str(cu.get("name", "")), str(cu.get("input", ""))
        return ir.ToolCallPart(id=call_id, name=name, arguments=raw, kind="custom")
    fn = tc.get("function")
    if not isinstance(fn, dict):
        return None
    args = fn.get("arguments")
    if not isinstance(args, str):
        args = orjson.dumps(args).decode() if args is not None else "{}"
    return ir.ToolCallPart(id=call_id, name=str(fn.get("name") or ""), arguments=args or "{}")


def decode_response(body: bytes) -> ir.Response:
    """Upstream non-streamed body -> IR."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_upstream("the upstream returned a body that is not JSON") from None
    if not isinstance(data, dict):
        raise bad_upstream("the upstream returned an unexpected body")
    if isinstance(data.get("error"), dict):
        raise bad_upstream(str(data["error"].get("message") or "the upstream reported an error"))
    content: list[ir.Part] = []
    finish = None
    refused = False
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        ch = choices[0]
        finish = ch.get("finish_reason")
        msg = ch.get("message") if isinstance(ch.get("message"), dict) else {}
        rtext = reasoning_text(msg)
        if rtext:
            content.append(ir.ReasoningPart(text=rtext))
        c = msg.get("content")
        if isinstance(c, str) and c:
            content.append(ir.TextPart(text=c))
        elif isinstance(c, list):  # some compatible servers answer with parts
            text = "".join(p.get("text", "") for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
            if text:
                content.append(ir.TextPart(text=text))
        if isinstance(msg.get("refusal"), str) and msg["refusal"]:
            content.append(ir.TextPart(text=msg["refusal"]))
            refused = True
        for tc in msg.get("tool_calls") or []:
            part = _tool_call(tc)
            if part is not None:
                content.append(part)
        fc = msg.get("function_call")
        if isinstance(fc, dict):
            part = _tool_call({"function": fc})
            if part is not None:
                content.append(part)
    has_calls = any(isinstance(p, ir.ToolCallPart) for p in content)
    stop = ir.StopReason.CONTENT_FILTER if refused else stop_from_finish(finish, has_calls)
    return ir.Response(
        id=str(data.get("id") or ""),
        model=str(data.get("model") or ""),
        content=content,
        stop_reason=stop,
        usage=usage_from_wire(data.get("usage")) or ir.Usage(),
    )


# ---------------------------------------------------------------- client response


def legacy_functions(ctx: EncodeContext) -> bool:
    return bool(ctx.request is not None and ctx.request.provider_data.get(NAME, {}).get("legacy_functions"))


def completion_id(resp_id: str | None, ctx: EncodeContext) -> str:
    return resp_id if resp_id and resp_id.startswith("chatcmpl") else f"chatcmpl-{ctx.request_id}"


def encode_response(resp: ir.Response, ctx: EncodeContext) -> bytes:
    """IR -> client ``chat.completion`` body."""
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for p in resp.content:
        if isinstance(p, ir.TextPart):
            texts.append(p.text)
        elif isinstance(p, ir.ReasoningPart):
            if p.text:
                reasoning.append(p.text)
        elif isinstance(p, ir.ToolCallPart):
            if p.kind == "custom":
                calls.append({"id": p.id, "type": "custom", "custom": {"name": p.name, "input": p.arguments}})
            else:
                calls.append({"id": p.id, "type": "function", "function": {"name": p.name, "arguments": p.arguments}})
    legacy = legacy_functions(ctx)
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None, "refusal": None}
    if reasoning:
        msg["reasoning_content"] = "".join(reasoning)
    if calls and legacy:
        fn = calls[0].get("function") or {"name": calls[0]["custom"]["name"], "arguments": calls[0]["custom"]["input"]}
        msg["function_call"] = fn
    elif calls:
        msg["tool_calls"] = calls
    msg["annotations"] = []
    body = {
        "id": completion_id(resp.id, ctx),
        "object": "chat.completion",
        "created": ctx.created,
        "model": ctx.model,
        "choices": [
            {
                "index": 0,
                "message": msg,
                "logprobs": None,
                "finish_reason": finish_from_stop(resp.stop_reason, bool(calls), legacy),
            }
        ],
        "usage": usage_to_wire(resp.usage),
        "system_fingerprint": None,
    }
    return orjson.dumps(body)
