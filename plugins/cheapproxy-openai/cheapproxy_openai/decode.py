"""Client side, inbound: a Chat Completions request body -> ir.Request."""

from __future__ import annotations

from typing import Any

import orjson

from cheapproxy import ir

from .common import NAME, bad, new_call_id, reasoning_text

# knobs with no IR field: kept so an openai-chat upstream reached by translation
# (fallback) gets them back; every other target drops them
EXTRA_KEYS = (
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "metadata",
    "store",
    "service_tier",
    "verbosity",
    "prompt_cache_key",
    "safety_identifier",
    "prediction",
    "web_search_options",
    "modalities",
    "audio",
)

EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


def _num(body: dict[str, Any], key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(f"'{key}' must be a number", key)
    return float(v)


def _int(body: dict[str, Any], key: str, minimum: int = 0) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise bad(f"'{key}' must be an integer >= {minimum}", key)
    return v


def parse_data_url(url: str, param: str) -> tuple[str, str]:
    """``data:<type>;base64,<b64>`` -> (media type, base64)."""
    head, sep, data = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise bad("data URLs must be base64 encoded (data:<type>;base64,...)", param)
    return head[5:-7] or "application/octet-stream", data


def _text_of(content: Any, param: str) -> list[ir.TextPart]:
    """System / developer / tool content: a string or text parts."""
    if isinstance(content, str):
        return [ir.TextPart(text=content)]
    if content is None:
        return []
    if not isinstance(content, list):
        raise bad("content must be a string or an array of text parts", param)
    out = []
    for j, p in enumerate(content):
        if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
            raise bad("only text parts are allowed here", f"{param}[{j}]")
        out.append(ir.TextPart(text=p["text"]))
    return out


def _user_part(p: Any, param: str) -> ir.Part:
    if not isinstance(p, dict):
        raise bad("content parts must be objects", param)
    t = p.get("type")
    if t == "text":
        if not isinstance(p.get("text"), str):
            raise bad("text parts need a string 'text'", f"{param}.text")
        return ir.TextPart(text=p["text"])
    if t == "image_url":
        img = p.get("image_url")
        if isinstance(img, str):  # lenient: some clients send the URL directly
            img = {"url": img}
        if not isinstance(img, dict) or not isinstance(img.get("url"), str):
            raise bad("image_url parts need image_url.url", f"{param}.image_url.url")
        url, detail = img["url"], img.get("detail")
        detail = detail if isinstance(detail, str) else None
        if url.startswith("data:"):
            media, data = parse_data_url(url, f"{param}.image_url.url")
            return ir.ImagePart(media_type=media, data=data, detail=detail)
        return ir.ImagePart(url=url, detail=detail)
    if t == "input_audio":
        audio = p.get("input_audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            raise bad("input_audio parts need input_audio.data", f"{param}.input_audio.data")
        fmt = audio.get("format") if isinstance(audio.get("format"), str) else "wav"
        return ir.FilePart(media_type=f"audio/{'mpeg' if fmt == 'mp3' else fmt}", data=audio["data"])
    if t == "file":
        f = p.get("file")
        if not isinstance(f, dict):
            raise bad("file parts need a file object", f"{param}.file")
        filename = f.get("filename") if isinstance(f.get("filename"), str) else None
        if isinstance(f.get("file_data"), str):
            fd = f["file_data"]
            if fd.startswith("data:"):
                media, data = parse_data_url(fd, f"{param}.file.file_data")
            else:
                media, data = ("application/pdf", fd)
            return ir.FilePart(media_type=media, data=data, filename=filename)
        if isinstance(f.get("file_id"), str):
            return ir.FilePart(file_id=f["file_id"], filename=filename)
        raise bad("file parts need file_data or file_id", f"{param}.file")
    raise bad(f"unsupported content part type {t!r}", f"{param}.type")


def _arguments(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # lenient: some clients send the object itself
        return orjson.dumps(value).decode()
    if value is None:
        return "{}"
    raise bad("function.arguments must be a JSON string", param)


def _assistant(m: dict[str, Any], param: str, names: dict[str, str]) -> ir.Message:
    parts: list[ir.Part] = []
    rtext = reasoning_text(m)
    if rtext:
        parts.append(ir.ReasoningPart(text=rtext))
    content = m.get("content")
    if isinstance(content, str):
        if content:
            parts.append(ir.TextPart(text=content))
    elif isinstance(content, list):
        for j, p in enumerate(content):
            if isinstance(p, dict) and p.get("type") in ("text", "refusal"):
                text = p.get("text") if p["type"] == "text" else p.get("refusal")
                if isinstance(text, str) and text:
                    parts.append(ir.TextPart(text=text))
            else:
                raise bad("assistant content parts must be text or refusal", f"{param}.content[{j}]")
    elif content is not None:
        raise bad("assistant content must be a string, an array or null", f"{param}.content")
    if isinstance(m.get("refusal"), str) and m["refusal"] and not content:
        parts.append(ir.TextPart(text=m["refusal"]))
    calls = m.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        raise bad("tool_calls must be an array", f"{param}.tool_calls")
    for j, tc in enumerate(calls or []):
        cp = f"{param}.tool_calls[{j}]"
        if not isinstance(tc, dict):
            raise bad("tool calls must be objects", cp)
        call_id = tc.get("id") if isinstance(tc.get("id"), str) and tc.get("id") else new_call_id()
        if tc.get("type") == "custom":
            cu = tc.get("custom")
            if not isinstance(cu, dict) or not isinstance(cu.get("name"), str):
                raise bad("custom tool calls need custom.name", f"{cp}.custom.name")
            inp = cu.get("input")
            inp = inp if isinstance(inp, str) else ""
            parts.append(ir.ToolCallPart(id=call_id, name=cu["name"], arguments=inp, kind="custom"))
        else:
            fn = tc.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad("tool calls need function.name", f"{cp}.function.name")
            args = _arguments(fn.get("arguments"), f"{cp}.function.arguments")
            parts.append(ir.ToolCallPart(id=call_id, name=fn["name"], arguments=args))
        names[call_id] = parts[-1].name  # type: ignore[union-attr]
    fc = m.get("function_call")
    if isinstance(fc, dict) and isinstance(fc.get("name"), str):
        call_id = new_call_id()
        args = _arguments(fc.get("arguments"), f"{param}.function_call.arguments")
        parts.append(ir.ToolCallPart(id=call_id, name=fc["name"], arguments=args))
        names[call_id] = fc["name"]
    return ir.Message(role="assistant", content=parts)


def _messages(raw: Any, req: ir.Request) -> None:
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty array", "messages")
    names: dict[str, str] = {}  # tool call id -> function name, for ToolResultPart.name
    leading = True
    msgs = req.messages
    for i, m in enumerate(raw):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad("each message must be an object", param)
        role = m.get("role")
        if role in ("system", "developer"):
            parts = _text_of(m.get("content"), f"{param}.content")
            if role == "developer":
                for p in parts:
                    p.provider_data[NAME] = {"role": "developer"}
            if leading:
                req.system.extend(parts)
            else:
                msgs.append(ir.Message(role="system", content=list(parts)))
            continue
        leading = False
        if role == "user":
            content = m.get("content")
            if isinstance(content, str):
                parts_u: list[ir.Part] = [ir.TextPart(text=content)]
            elif isinstance(content, list):
                parts_u = [_user_part(p, f"{param}.content[{j}]") for j, p in enumerate(content)]
            else:
                raise bad("user content must be a string or an array of parts", f"{param}.content")
            msgs.append(ir.Message(role="user", content=parts_u))
        elif role == "assistant":
            msgs.append(_assistant(m, param, names))
        elif role in ("tool", "function"):
            if role == "tool":
                call_id = m.get("tool_call_id")
                if not isinstance(call_id, str):
                    raise bad("tool messages need a string tool_call_id", f"{param}.tool_call_id")
                name = names.get(call_id)
            else:  # legacy: answered by name, pair with the latest call of that name
                name = m.get("name") if isinstance(m.get("name"), str) else None
                call_id = next((cid for cid, n in reversed(names.items()) if n == name), None) or new_call_id()
            content = m.get("content")
            if isinstance(content, list):
                tparts: list[ir.Part] = [_user_part(p, f"{param}.content[{j}]") for j, p in enumerate(content)]
            else:
                text = content if content is not None else ""
                tparts = _text_of(text, f"{param}.content")  # type: ignore[assignment]
            result = ir.ToolResultPart(tool_call_id=call_id, name=name, content=tparts)
            prev = msgs[-1] if msgs else None
            # consecutive tool messages answer one step: one user turn of results
            if prev is not None and prev.role == "user" and prev.content and all(
                isinstance(p, ir.ToolResultPart) for p in prev.content
            ):
                prev.content.append(result)
            else:
                msgs.append(ir.Message(role="user", content=[result]))
        else:
            raise bad(f"unsupported message role {role!r}", f"{param}.role")


def _tools(body: dict[str, Any], req: ir.Request) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad("'tools' must be an array", "tools")
        for i, t in enumerate(tools):
            param = f"tools[{i}]"
            if not isinstance(t, dict):
                raise bad("tools must be objects", param)
            if t.get("type") == "custom":
                cu = t.get("custom")
                if not isinstance(cu, dict) or not isinstance(cu.get("name"), str):
                    raise bad("custom tools need custom.name", f"{param}.custom.name")
                pd = {NAME: {"format": cu["format"]}} if "format" in cu else {}
                desc = cu.get("description") if isinstance(cu.get("description"), str) else None
                req.tools.append(ir.Tool(name=cu["name"], description=desc, kind="custom", provider_data=pd))
                continue
            if t.get("type", "function") != "function":
                raise bad(f"unsupported tool type {t.get('type')!r}", f"{param}.type")
            fn = t.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad("function tools need function.name", f"{param}.function.name")
            req.tools.append(_tool(fn))
    functions = body.get("functions")
    if isinstance(functions, list) and tools is None:
        for i, fn in enumerate(functions):
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad("functions need a name", f"functions[{i}].name")
            req.tools.append(_tool(fn))
        req.provider_data.setdefault(NAME, {})["legacy_functions"] = True


def _tool(fn: dict[str, Any]) -> ir.Tool:
    params = fn.get("parameters")
    desc = fn.get("description")
    tool = ir.Tool(name=fn["name"], description=desc if isinstance(desc, str) else None)
    if isinstance(params, dict):
        tool.parameters = params
    if isinstance(fn.get("strict"), bool):
        tool.strict = fn["strict"]
    return tool


def _tool_choice(body: dict[str, Any], req: ir.Request) -> None:
    tc = body.get("tool_choice", body.get("function_call"))
    choice: ir.ToolChoice | None = None
    if isinstance(tc, str):
        if tc not in ("auto", "none", "required"):
            raise bad(f"invalid tool_choice {tc!r}", "tool_choice")
        choice = ir.ToolChoice(mode=tc)  # type: ignore[arg-type]
    elif isinstance(tc, dict):
        t = tc.get("type")
        if t == "allowed_tools":
            at = tc.get("allowed_tools")
            if not isinstance(at, dict) or not isinstance(at.get("tools"), list):
                raise bad("allowed_tools needs a tools array", "tool_choice.allowed_tools")
            allowed = set()
            for a in at["tools"]:
                if isinstance(a, dict):
                    inner = a.get(a.get("type", "function"))
                    if isinstance(inner, dict) and isinstance(inner.get("name"), str):
                        allowed.add(inner["name"])
            # IR has no allowed list: offer only the allowed tools (same answer, no cache reuse)
            req.tools = [t_ for t_ in req.tools if t_.name in allowed]
            mode = at.get("mode", "auto")
            choice = ir.ToolChoice(mode="required" if mode == "required" else "auto")
        else:
            inner = tc.get(t) if t in ("function", "custom") else tc  # legacy {"name": ...}
            if not isinstance(inner, dict) or not isinstance(inner.get("name"), str):
                raise bad("a named tool_choice needs a name", "tool_choice")
            choice = ir.ToolChoice(mode="tool", name=inner["name"])
    elif tc is not None:
        raise bad("tool_choice must be a string or an object", "tool_choice")
    ptc = body.get("parallel_tool_calls")
    if isinstance(ptc, bool) and req.tools:
        choice = choice or ir.ToolChoice(mode="auto")
        choice.parallel = ptc
    req.tool_choice = choice


def _reasoning(body: dict[str, Any]) -> ir.Reasoning | None:
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in EFFORTS:
            raise bad(f"reasoning_effort must be one of {', '.join(EFFORTS)}", "reasoning_effort")
        return ir.Reasoning(enabled=effort != "none", effort=effort)
    # OpenAI-compatible conventions: litellm's Anthropic-style "thinking" and
    # OpenRouter's "reasoning" object
    th = body.get("thinking")
    if isinstance(th, dict):
        if th.get("type") == "disabled":
            return ir.Reasoning(enabled=False)
        budget = th.get("budget_tokens")
        return ir.Reasoning(
            budget_tokens=budget if isinstance(budget, int) and not isinstance(budget, bool) else None,
            adaptive=th.get("type") == "adaptive",
        )
    rs = body.get("reasoning")
    if isinstance(rs, dict):
        if rs.get("enabled") is False or rs.get("effort") == "none":
            return ir.Reasoning(enabled=False, effort="none" if rs.get("effort") == "none" else None)
        eff = rs.get("effort") if rs.get("effort") in EFFORTS else None
        mt = rs.get("max_tokens")
        return ir.Reasoning(
            effort=eff,
            budget_tokens=mt if isinstance(mt, int) and not isinstance(mt, bool) else None,
            include_thoughts=rs.get("exclude") is not True,
        )
    return None


def _response_format(body: dict[str, Any]) -> ir.ResponseFormat | None:
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise bad("response_format.type must be text, json_object or json_schema", "response_format")
    if rf["type"] != "json_schema":
        return ir.ResponseFormat(type=rf["type"])
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise bad("json_schema response_format needs a json_schema object", "response_format.json_schema")
    schema = js.get("schema")
    return ir.ResponseFormat(
        type="json_schema",
        schema=schema if isinstance(schema, dict) else None,
        name=js.get("name") if isinstance(js.get("name"), str) else None,
        strict=js.get("strict") if isinstance(js.get("strict"), bool) else None,
    )


def decode_request(body: dict[str, Any]) -> ir.Request:
    """Wire body -> IR.  Raises ProxyError(invalid_request) naming the field."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("you must provide a model parameter", "model")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("'stream' must be a boolean", "stream")
    req = ir.Request(model=model, stream=bool(stream))
    _messages(body.get("messages"), req)
    _tools(body, req)
    _tool_choice(body, req)
    mct = _int(body, "max_completion_tokens", 1)
    req.max_tokens = mct if mct is not None else _int(body, "max_tokens", 1)
    req.temperature = _num(body, "temperature")
    req.top_p = _num(body, "top_p")
    req.top_k = _int(body, "top_k", 1)  # non-standard (vLLM and other compatible servers)
    req.n = _int(body, "n", 1)
    req.seed = _int(body, "seed", -(2**63))
    stop = body.get("stop")
    if isinstance(stop, str):
        req.stop = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        req.stop = list(stop)
    elif stop is not None:
        raise bad("'stop' must be a string or an array of strings", "stop")
    user = body.get("user", body.get("safety_identifier"))
    req.user = user if isinstance(user, str) else None
    req.reasoning = _reasoning(body)
    req.response_format = _response_format(body)
    pd = req.provider_data.setdefault(NAME, {})
    so = body.get("stream_options")
    pd["include_usage"] = bool(req.stream and isinstance(so, dict) and so.get("include_usage") is True)
    extra = {k: body[k] for k in EXTRA_KEYS if k in body}
    if extra:
        pd["extra"] = extra
    return req


def decode_embeddings_request(body: dict[str, Any]) -> ir.EmbeddingRequest:
    """Wire embeddings body -> IR."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("you must provide a model parameter", "model")
    raw = body.get("input")
    if isinstance(raw, str):
        inputs: list[Any] = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        inputs = [raw]  # one pre-tokenized input
    elif isinstance(raw, list) and raw and all(
        isinstance(x, str) or (isinstance(x, list) and all(isinstance(t, int) for t in x)) for x in raw
    ):
        inputs = list(raw)
    else:
        raise bad("'input' must be a string, an array of strings or an array of token arrays", "input")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise bad("encoding_format must be 'float' or 'base64'", "encoding_format")
    dims = _int(body, "dimensions", 1)
    user = body.get("user")
    return ir.EmbeddingRequest(
        model=model, inputs=inputs, dimensions=dims, encoding_format=fmt, user=user if isinstance(user, str) else None
    )
