"""Client side, request: a Gemini ``generateContent`` / ``countTokens`` body ->
ir.Request.  Both camelCase and snake_case spellings are accepted (the
google-genai SDK sends ``parameters_json_schema``, ``mime_type``,
``thinking_budget`` ... in snake_case inside camelCase objects)."""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.errors import ProxyError

from .schema import openapi_to_json_schema
from .wire import PROTOCOL, get, new_call_id

# effort names by thinking budget: nearest default budget not above the value
_BUDGET_EFFORT = ((64000, "max"), (32768, "xhigh"), (16384, "high"), (4096, "medium"), (1024, "low"))

# generationConfig keys the IR models; the others are kept for a Gemini upstream
_MODELED_GEN = frozenset({
    "maxOutputTokens", "temperature", "topP", "topK", "stopSequences", "candidateCount", "seed",
    "responseMimeType", "responseJsonSchema", "responseSchema", "thinkingConfig",
})


def _bad(message: str, param: str) -> ProxyError:
    return ProxyError("invalid_request", message, param=param)


def budget_to_effort(budget: int) -> str:
    for threshold, effort in _BUDGET_EFFORT:
        if budget >= threshold:
            return effort
    return "minimal"


def _number(v: Any, param: str, kind: type = float) -> Any:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(f"{param} must be a number", param)
    return kind(v)


def std_b64(data: str) -> str:
    """The SDK sends bytes as URL-safe base64; other protocols want the
    standard alphabet."""
    if "-" in data or "_" in data:
        data = data.replace("-", "+").replace("_", "/")
    return data


class _CallIds:
    """Ids for function calls that came without one, and the matching of
    functionResponse parts (by name, in order) to those calls."""

    def __init__(self) -> None:
        self.pending: dict[str, deque[str]] = defaultdict(deque)

    def call(self, name: str, wire_id: Any) -> str:
        cid = wire_id if isinstance(wire_id, str) and wire_id else new_call_id()
        self.pending[name].append(cid)
        return cid

    def result(self, name: str, wire_id: Any) -> str:
        if isinstance(wire_id, str) and wire_id:
            q = self.pending.get(name)
            if q and wire_id in q:
                q.remove(wire_id)
            return wire_id
        q = self.pending.get(name)
        if q:
            return q.popleft()
        return new_call_id()


def _signature(part: dict[str, Any]) -> str | None:
    sig = get(part, "thoughtSignature")
    return sig if isinstance(sig, str) and sig else None


def _mime(obj: Any, param: str) -> str | None:
    if not isinstance(obj, dict):
        raise _bad(f"{param} must be an object", param)
    mime = get(obj, "mimeType")
    return mime if isinstance(mime, str) else None


def _decode_part(part: Any, role: str, ids: _CallIds, param: str) -> list[ir.Part]:
    if not isinstance(part, dict):
        raise _bad(f"{param} must be an object", param)
    sig = _signature(part)
    if "text" in part:
        text = part["text"]
        if not isinstance(text, str):
            raise _bad(f"{param}.text must be a string", f"{param}.text")
        if part.get("thought") is True:
            return [ir.ReasoningPart(text=text, signature=sig, signature_protocol=PROTOCOL if sig else None)]
        tp = ir.TextPart(text=text)
        if sig:
            tp.provider_data[PROTOCOL] = {"thoughtSignature": sig}
        return [tp]
    inline = get(part, "inlineData")
    if inline is not None:
        p = f"{param}.inlineData"
        mime = _mime(inline, p)
        data = inline.get("data")
        if not isinstance(data, str) or not data:
            raise _bad(f"{p}.data must be a base64 string", f"{p}.data")
        if mime is None:
            raise _bad(f"{p}.mimeType is required", f"{p}.mimeType")
        data = std_b64(data)
        if mime.startswith("image/"):
            return [ir.ImagePart(media_type=mime, data=data)]
        return [ir.FilePart(media_type=mime, data=data)]
    fdata = get(part, "fileData")
    if fdata is not None:
        p = f"{param}.fileData"
        mime = _mime(fdata, p)
        uri = get(fdata, "fileUri")
        if not isinstance(uri, str) or not uri:
            raise _bad(f"{p}.fileUri must be a string", f"{p}.fileUri")
        if mime and mime.startswith("image/"):
            return [ir.ImagePart(media_type=mime, url=uri)]
        return [ir.FilePart(media_type=mime, url=uri)]
    fc = get(part, "functionCall")
    if fc is not None:
        if not isinstance(fc, dict) or not isinstance(fc.get("name"), str) or not fc["name"]:
            raise _bad(f"{param}.functionCall.name is required", f"{param}.functionCall.name")
        if role != "model":
            raise _bad(f"{param}: functionCall parts belong in role 'model' turns", param)
        args = fc.get("args", {})
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise _bad(f"{param}.functionCall.args must be an object", f"{param}.functionCall.args")
        tc = ir.ToolCallPart(id=ids.call(fc["name"], fc.get("id")), name=fc["name"], arguments=orjson.dumps(args).decode())
        if sig:
            tc.provider_data[PROTOCOL] = {"thoughtSignature": sig}
        return [tc]
    fr = get(part, "functionResponse")
    if fr is not None:
        return [_decode_function_response(fr, ids, f"{param}.functionResponse")]
    code = get(part, "executableCode")
    if isinstance(code, dict):
        # code execution history has no IR equivalent: keep it readable as text
        lang = str(code.get("language", "")).lower().replace("language_unspecified", "")
        return [ir.TextPart(text=f"```{lang}\n{code.get('code', '')}\n```")]
    result = get(part, "codeExecutionResult")
    if isinstance(result, dict):
        return [ir.TextPart(text=f"```\n{result.get('output', '')}\n```")]
    if sig:  # a bare signature part
        tp = ir.TextPart(text="")
        tp.provider_data[PROTOCOL] = {"thoughtSignature": sig}
        return [tp]
    return []  # videoMetadata-only and unknown parts carry no content


def _decode_function_response(fr: Any, ids: _CallIds, param: str) -> ir.ToolResultPart:
    if not isinstance(fr, dict) or not isinstance(fr.get("name"), str) or not fr["name"]:
        raise _bad(f"{param}.name is required", f"{param}.name")
    resp = fr.get("response", {})
    if not isinstance(resp, dict):
        raise _bad(f"{param}.response must be an object", f"{param}.response")
    is_error = False
    value: Any
    # conventions: {"output": ...} (Google docs), {"result": ...} (the SDK's
    # automatic function calling), {"error": ...}; anything else is the output
    if set(resp) == {"error"}:
        is_error, value = True, resp["error"]
    elif len(resp) == 1 and ("output" in resp or "result" in resp):
        value = next(iter(resp.values()))
    else:
        value = resp
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    content: list[ir.Part] = [ir.TextPart(text=text)]
    for i, sub in enumerate(fr.get("parts") or []):  # multimodal function responses
        if isinstance(sub, dict) and get(sub, "inlineData") is not None:
            content.extend(_decode_part(sub, "user", ids, f"{param}.parts[{i}]"))
    name = fr["name"]
    return ir.ToolResultPart(tool_call_id=ids.result(name, fr.get("id")), name=name, content=content, is_error=is_error)


def _system(value: Any) -> list[ir.TextPart]:
    if value is None:
        return []
    if isinstance(value, str):
        return [ir.TextPart(text=value)]
    if not isinstance(value, dict) or not isinstance(value.get("parts", []), list):
        raise _bad("systemInstruction must be a Content object with parts", "systemInstruction")
    out = []
    for i, p in enumerate(value.get("parts", [])):
        if not isinstance(p, dict) or not isinstance(p.get("text"), str):
            raise _bad("systemInstruction parts must be text", f"systemInstruction.parts[{i}]")
        out.append(ir.TextPart(text=p["text"]))
    return out


def _tools(value: Any, request: ir.Request) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        raise _bad("tools must be a list", "tools")
    builtin: list[Any] = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise _bad("tools entries must be objects", f"tools[{i}]")
        decls = get(tool, "functionDeclarations")
        if decls is None:
            builtin.append(tool)  # googleSearch, codeExecution, urlContext ...
            continue
        if not isinstance(decls, list):
            raise _bad("functionDeclarations must be a list", f"tools[{i}].functionDeclarations")
        for j, d in enumerate(decls):
            p = f"tools[{i}].functionDeclarations[{j}]"
            if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not d["name"]:
                raise _bad(f"{p}.name is required", f"{p}.name")
            schema = get(d, "parametersJsonSchema")
            if schema is None and get(d, "parameters") is not None:
                schema = openapi_to_json_schema(get(d, "parameters"))
            if schema is None:
                schema = {"type": "object", "properties": {}}
            if not isinstance(schema, dict):
                raise _bad(f"{p}.parameters must be an object", f"{p}.parameters")
            desc = d.get("description")
            request.tools.append(ir.Tool(name=d["name"], description=desc if isinstance(desc, str) else None, parameters=schema))
    if builtin:
        request.provider_data.setdefault(PROTOCOL, {})["builtin_tools"] = builtin


def _tool_config(value: Any, request: ir.Request) -> None:
    if not isinstance(value, dict):
        return
    fcc = get(value, "functionCallingConfig")
    if not isinstance(fcc, dict):
        return
    mode = str(get(fcc, "mode", "AUTO")).upper()
    allowed = get(fcc, "allowedFunctionNames")
    if allowed is not None and (not isinstance(allowed, list) or not all(isinstance(x, str) for x in allowed)):
        raise _bad("allowedFunctionNames must be a list of names", "toolConfig.functionCallingConfig.allowedFunctionNames")
    if mode == "NONE":
        request.tool_choice = ir.ToolChoice(mode="none")
        return
    if allowed:
        # the IR has no allow-list: restrict the declared tools instead (5.5)
        request.tools = [t for t in request.tools if t.name in allowed]
    if mode == "ANY":
        if allowed and len(allowed) == 1:
            request.tool_choice = ir.ToolChoice(mode="tool", name=allowed[0])
        else:
            request.tool_choice = ir.ToolChoice(mode="required")
    else:  # AUTO, VALIDATED, MODE_UNSPECIFIED
        request.tool_choice = ir.ToolChoice(mode="auto")


def _thinking(tc: Any) -> ir.Reasoning | None:
    if not isinstance(tc, dict):
        return None
    include = get(tc, "includeThoughts", False) is True
    level = get(tc, "thinkingLevel")
    budget = get(tc, "thinkingBudget")
    if budget is not None:
        budget = _number(budget, "generationConfig.thinkingConfig.thinkingBudget", int)
        if budget == 0:
            return ir.Reasoning(enabled=False, effort="none", budget_tokens=0, include_thoughts=False)
        if budget < 0:  # -1 = dynamic: the model decides
            return ir.Reasoning(adaptive=True, include_thoughts=include)
        return ir.Reasoning(budget_tokens=budget, effort=budget_to_effort(budget), include_thoughts=include)
    if isinstance(level, str) and level and level.upper() != "THINKING_LEVEL_UNSPECIFIED":
        return ir.Reasoning(effort=level.lower(), include_thoughts=include)
    return ir.Reasoning(include_thoughts=include)


def _generation_config(gc: Any, request: ir.Request) -> None:
    if gc is None:
        return
    if not isinstance(gc, dict):
        raise _bad("generationConfig must be an object", "generationConfig")
    p = "generationConfig."
    mot = get(gc, "maxOutputTokens")
    request.max_tokens = _number(mot, p + "maxOutputTokens", int)
    request.temperature = _number(get(gc, "temperature"), p + "temperature")
    request.top_p = _number(get(gc, "topP"), p + "topP")
    request.top_k = _number(get(gc, "topK"), p + "topK", int)  # the SDK sends 20.0
    request.seed = _number(get(gc, "seed"), p + "seed", int)
    request.n = _number(get(gc, "candidateCount"), p + "candidateCount", int)
    stops = get(gc, "stopSequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("stopSequences must be a list of strings", p + "stopSequences")
        request.stop = list(stops)
    mime = get(gc, "responseMimeType")
    if mime == "application/json":
        schema = get(gc, "responseJsonSchema")
        if schema is None and get(gc, "responseSchema") is not None:
            schema = openapi_to_json_schema(get(gc, "responseSchema"))
        if isinstance(schema, dict):
            request.response_format = ir.ResponseFormat(type="json_schema", schema=schema, name="response")
        else:
            request.response_format = ir.ResponseFormat(type="json_object")
    request.reasoning = _thinking(get(gc, "thinkingConfig"))
    extra = {k: v for k, v in gc.items() if _camel_known(k) not in _MODELED_GEN}
    if mime not in (None, "application/json", "text/plain"):
        extra["responseMimeType"] = mime  # e.g. text/x.enum with its schema
        for key in ("responseSchema", "responseJsonSchema"):
            if get(gc, key) is not None:
                extra[key] = get(gc, key)
    if extra:
        request.provider_data.setdefault(PROTOCOL, {})["generationConfig"] = extra


def _camel_known(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def decode_contents(contents: Any, request: ir.Request, param: str = "contents") -> None:
    if not isinstance(contents, list):
        raise _bad(f"{param} must be a list of Content objects", param)
    ids = _CallIds()
    for i, c in enumerate(contents):
        p = f"{param}[{i}]"
        if not isinstance(c, dict):
            raise _bad(f"{p} must be an object", p)
        role = c.get("role") or "user"
        if role == "function":  # very old examples send tool results this way
            role = "user"
        if role not in ("user", "model"):
            raise _bad(f"{p}.role must be 'user' or 'model', got {role!r}", f"{p}.role")
        parts = c.get("parts", [])
        if not isinstance(parts, list):
            raise _bad(f"{p}.parts must be a list", f"{p}.parts")
        msg = ir.Message(role="assistant" if role == "model" else "user")
        for j, part in enumerate(parts):
            msg.content.extend(_decode_part(part, role, ids, f"{p}.parts[{j}]"))
        request.messages.append(msg)


def decode_generate_request(body: dict[str, Any], model: str, *, stream: bool, counting: bool = False) -> ir.Request:
    """A generateContent body -> IR (``counting``: a countTokens body, which
    may have empty contents)."""
    request = ir.Request(model=model, stream=stream)
    if "contents" not in body:
        raise _bad("contents is required", "contents")
    decode_contents(body["contents"], request)
    request.system = _system(get(body, "systemInstruction"))
    _tools(get(body, "tools"), request)
    _tool_config(get(body, "toolConfig"), request)
    _generation_config(get(body, "generationConfig"), request)
    keep = {}
    for key in ("safetySettings", "cachedContent"):
        if get(body, key) is not None:
            keep[key] = get(body, key)
    if keep:
        request.provider_data.setdefault(PROTOCOL, {}).update(keep)
    if not counting and not request.messages:
        raise _bad("contents must not be empty", "contents")
    return request


def decode_count_request(body: dict[str, Any], model: str) -> ir.Request:
    """A countTokens body: ``contents`` or ``generateContentRequest``."""
    inner = get(body, "generateContentRequest")
    if inner is not None and "contents" in body:
        raise _bad("contents and generateContentRequest are mutually exclusive", "generateContentRequest")
    if inner is not None:
        if not isinstance(inner, dict):
            raise _bad("generateContentRequest must be an object", "generateContentRequest")
        return decode_generate_request(inner, model, stream=False, counting=True)
    return decode_generate_request(body, model, stream=False, counting=True)
