"""Client side: a Responses API request body -> ir.Request.

Handles the shapes Codex and the official SDK send (clients.md): developer
messages as system prompts, input items with ids, function / custom tool calls
and their outputs paired by ``call_id``, ``namespace`` tools, hosted tools,
replayed reasoning items with ``encrypted_content``.  Everything that only
steers OpenAI's own storage or caching is dropped (see README "Lossy").
"""

from __future__ import annotations

from typing import Any

from cheapproxy import ir
from cheapproxy.errors import ProxyError

from .common import PROTOCOL, flat_tool_name, parse_data_url, summary_texts, unwrap_signature

# server-side state a translating gateway cannot reproduce: refusing beats
# answering without the conversation the client believes it sent
_STATEFUL = ("previous_response_id", "conversation", "prompt")

# input items of hosted tools and server-side features: no cross-protocol form
_DROPPED_ITEMS = frozenset({
    "web_search_call", "file_search_call", "computer_call", "computer_call_output", "code_interpreter_call",
    "image_generation_call", "local_shell_call", "local_shell_call_output", "shell_call", "shell_call_output",
    "apply_patch_call", "apply_patch_call_output", "mcp_call", "mcp_list_tools", "mcp_approval_request",
    "mcp_approval_response", "item_reference", "compaction", "tool_search_call", "tool_search_output",
    "additional_tools", "program", "program_output",
})

_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh", "max"})


def _bad(msg: str, param: str) -> ProxyError:
    return ProxyError("invalid_request", msg, param=param)


def decode_request(body: dict[str, Any]) -> ir.Request:
    """Decode a Responses request body (already parsed JSON) into IR."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("you must provide a model parameter", "model")
    for key in _STATEFUL:
        if body.get(key):
            raise _bad(f"{key} is not supported by this gateway when the model is served through another "
                       "protocol: send the whole conversation in input", key)
    if body.get("background"):
        raise _bad("background mode is not supported by this gateway", "background")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream")
    req = ir.Request(model=model, stream=stream)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _bad("instructions must be a string", "instructions")
    if instructions:
        req.system.append(ir.TextPart(text=instructions))
    _InputDecoder(req).decode(body.get("input"))
    _decode_tools(req, body.get("tools"))
    _decode_tool_choice(req, body.get("tool_choice"), body.get("parallel_tool_calls"))
    _decode_sampling(req, body)
    _decode_reasoning(req, body.get("reasoning"))
    _decode_text(req, body.get("text"))
    return req


class _InputDecoder:
    """Folds the flat item list into IR turns: assistant-side items (messages,
    reasoning, calls) of one step share one assistant Message, consecutive
    call outputs share one user Message."""

    def __init__(self, req: ir.Request) -> None:
        self.req = req
        self.calls: dict[str, str] = {}  # call_id -> IR tool name, to name results
        self.started = False  # a non-system item went by: later system text is mid-conversation

    def decode(self, inp: Any) -> None:
        if isinstance(inp, str):
            self._append("user", [ir.TextPart(text=inp)])
            return
        if inp is None:
            raise _bad("input is required", "input")
        if not isinstance(inp, list):
            raise _bad("input must be a string or an array of input items", "input")
        for i, item in enumerate(inp):
            path = f"input[{i}]"
            if not isinstance(item, dict):
                raise _bad(f"{path} must be an object", path)
            kind = item.get("type")
            if (kind is None and "role" in item) or kind == "message":
                self._message(item, path)
            elif kind in ("function_call", "custom_tool_call"):
                self._call(item, path, custom=kind == "custom_tool_call")
            elif kind in ("function_call_output", "custom_tool_call_output"):
                self._output(item, path)
            elif kind == "reasoning":
                self._reasoning(item)
            elif isinstance(kind, str):
                # hosted tools, item references, compaction and types newer than
                # this codec have no IR form; they are dropped (README: Lossy)
                continue
            else:
                raise _bad(f"{path}.type is required", f"{path}.type")

    # ------------------------------------------------------------ items

    def _message(self, item: dict[str, Any], path: str) -> None:
        role = item.get("role")
        content = item.get("content")
        if role in ("system", "developer"):
            parts = _text_parts(content, f"{path}.content")
            if not parts:
                return
            if self.started:
                self._append("system", parts, merge=False)
            else:
                self.req.system.extend(parts)
        elif role == "user":
            parts = _user_parts(content, f"{path}.content")
            self._append("user", parts, merge=False)
        elif role == "assistant":
            parts = _text_parts(content, f"{path}.content")
            if parts:
                self._append("assistant", parts)
        else:
            raise _bad(f"{path}.role must be one of user, assistant, system, developer", f"{path}.role")

    def _call(self, item: dict[str, Any], path: str, *, custom: bool) -> None:
        call_id, name = item.get("call_id"), item.get("name")
        if not isinstance(call_id, str) or not call_id:
            raise _bad(f"{path}.call_id is required", f"{path}.call_id")
        if not isinstance(name, str) or not name:
            raise _bad(f"{path}.name is required", f"{path}.name")
        if custom:
            args = item.get("input", "")
            if not isinstance(args, str):
                raise _bad(f"{path}.input must be a string", f"{path}.input")
        else:
            args = item.get("arguments", "")
            if not isinstance(args, str):
                raise _bad(f"{path}.arguments must be a JSON string", f"{path}.arguments")
            args = args or "{}"
        ir_name = flat_tool_name(item.get("namespace"), name)
        self.calls[call_id] = ir_name
        pd = {PROTOCOL: {"id": item["id"]}} if isinstance(item.get("id"), str) else {}
        part = ir.ToolCallPart(id=call_id, name=ir_name, arguments=args,
                               kind="custom" if custom else "function", provider_data=pd)
        self._append("assistant", [part])

    def _output(self, item: dict[str, Any], path: str) -> None:
        call_id = item.get("call_id")
        if not isinstance(call_id, str) or not call_id:
            raise _bad(f"{path}.call_id is required", f"{path}.call_id")
        out = item.get("output", "")
        if isinstance(out, str):
            content: list[ir.Part] = [ir.TextPart(text=out)] if out else []
        elif isinstance(out, list):
            content = _user_parts(out, f"{path}.output")
        else:
            raise _bad(f"{path}.output must be a string or an array of content parts", f"{path}.output")
        name = self.calls.get(call_id)
        if name is None and isinstance(item.get("name"), str):
            name = flat_tool_name(item.get("namespace"), item["name"])
        part = ir.ToolResultPart(tool_call_id=call_id, name=name, content=content)
        msgs = self.req.messages
        if msgs and msgs[-1].role == "user" and msgs[-1].content and all(
            isinstance(p, ir.ToolResultPart) for p in msgs[-1].content
        ):
            msgs[-1].content.append(part)
        else:
            self._append("user", [part], merge=False)

    def _reasoning(self, item: dict[str, Any]) -> None:
        text = "\n\n".join(summary_texts(item))
        enc = item.get("encrypted_content")
        sig = proto = redacted = None
        if isinstance(enc, str) and enc:
            sig, proto, redacted = unwrap_signature(enc)
        if not text and not sig and not redacted:
            return  # nothing any upstream could use (store:false makes the id useless)
        pd: dict[str, Any] = {}
        if proto == PROTOCOL:
            pd = {PROTOCOL: {"id": item.get("id"), "summary": item.get("summary") or []}}
        self._append("assistant", [ir.ReasoningPart(text=text, signature=sig, signature_protocol=proto,
                                                    redacted=redacted, provider_data=pd)])

    def _append(self, role: ir.Role, parts: list[ir.Part], *, merge: bool = True) -> None:
        if role != "system":
            self.started = True
        msgs = self.req.messages
        if merge and msgs and msgs[-1].role == role:
            msgs[-1].content.extend(parts)
        else:
            msgs.append(ir.Message(role=role, content=list(parts)))


# ---------------------------------------------------------------- content parts


def _text_parts(content: Any, param: str) -> list[ir.Part]:
    """Text of a system/developer/assistant message (string or parts)."""
    if isinstance(content, str):
        return [ir.TextPart(text=content)] if content else []
    if not isinstance(content, list):
        raise _bad(f"{param} must be a string or an array of content parts", param)
    out: list[ir.Part] = []
    for j, p in enumerate(content):
        if not isinstance(p, dict):
            raise _bad(f"{param}[{j}] must be an object", f"{param}[{j}]")
        kind = p.get("type")
        if kind in ("input_text", "output_text", "text"):
            text = p.get("text")
        elif kind == "refusal":
            text = p.get("refusal")
        else:
            raise _bad(f"{param}[{j}].type {kind!r} is not allowed here", f"{param}[{j}].type")
        if not isinstance(text, str):
            raise _bad(f"{param}[{j}].text must be a string", f"{param}[{j}].text")
        if text:
            out.append(ir.TextPart(text=text))
    return out


def _user_parts(content: Any, param: str) -> list[ir.Part]:
    """User message or tool output content: text, images, files."""
    if isinstance(content, str):
        return [ir.TextPart(text=content)]
    if not isinstance(content, list):
        raise _bad(f"{param} must be a string or an array of content parts", param)
    out: list[ir.Part] = []
    for j, p in enumerate(content):
        path = f"{param}[{j}]"
        if not isinstance(p, dict):
            raise _bad(f"{path} must be an object", path)
        kind = p.get("type")
        if kind in ("input_text", "output_text", "text"):
            text = p.get("text")
            if not isinstance(text, str):
                raise _bad(f"{path}.text must be a string", f"{path}.text")
            out.append(ir.TextPart(text=text))
        elif kind == "input_image":
            out.append(_image(p, path))
        elif kind == "input_file":
            out.append(_file(p, path))
        else:
            raise _bad(f"{path}.type {kind!r} is not supported", f"{path}.type")
    return out


def _image(p: dict[str, Any], path: str) -> ir.Part:
    url, detail = p.get("image_url"), p.get("detail")
    detail = detail if isinstance(detail, str) else None
    if isinstance(url, str) and url:
        if url.startswith("data:"):
            media_type, data = parse_data_url(url, f"{path}.image_url")
            return ir.ImagePart(media_type=media_type, data=data, detail=detail)
        if url.startswith(("http://", "https://")):
            return ir.ImagePart(url=url, detail=detail)
        raise _bad(f"{path}.image_url must be a data URL or an http(s) URL", f"{path}.image_url")
    if isinstance(p.get("file_id"), str):
        # an OpenAI file id only means something to OpenAI; other encoders refuse it
        return ir.FilePart(file_id=p["file_id"], provider_data={PROTOCOL: {"kind": "image", "detail": detail}})
    raise _bad(f"{path} needs image_url or file_id", path)


def _file(p: dict[str, Any], path: str) -> ir.Part:
    filename = p.get("filename") if isinstance(p.get("filename"), str) else None
    fdata = p.get("file_data")
    if isinstance(fdata, str) and fdata:
        if fdata.startswith("data:"):
            media_type, data = parse_data_url(fdata, f"{path}.file_data")
        else:
            media_type, data = _guess_type(filename), fdata
        return ir.FilePart(media_type=media_type, data=data, filename=filename)
    if isinstance(p.get("file_url"), str):
        return ir.FilePart(url=p["file_url"], filename=filename, media_type=_guess_type(p["file_url"]))
    if isinstance(p.get("file_id"), str):
        return ir.FilePart(file_id=p["file_id"], filename=filename)
    raise _bad(f"{path} needs file_data, file_url or file_id", path)


def _guess_type(name: str | None) -> str | None:
    if name and name.lower().endswith(".pdf"):
        return "application/pdf"
    return None


# ---------------------------------------------------------------- tools


def _decode_tools(req: ir.Request, tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise _bad("tools must be an array", "tools")
    for i, t in enumerate(tools):
        path = f"tools[{i}]"
        if not isinstance(t, dict):
            raise _bad(f"{path} must be an object", path)
        kind = t.get("type")
        if kind == "namespace":
            ns = t.get("name")
            if not isinstance(ns, str) or not ns:
                raise _bad(f"{path}.name is required", f"{path}.name")
            for j, sub in enumerate(t.get("tools") or []):
                if isinstance(sub, dict) and sub.get("type") in ("function", "custom"):
                    req.tools.append(_tool(sub, f"{path}.tools[{j}]", namespace=ns))
        elif kind in ("function", "custom"):
            req.tools.append(_tool(t, path, namespace=None))
        elif not isinstance(kind, str):
            raise _bad(f"{path}.type is required", f"{path}.type")
        # hosted tools (web_search, file_search, mcp, shell, ...) are dropped


def _tool(t: dict[str, Any], path: str, *, namespace: str | None) -> ir.Tool:
    name = t.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(f"{path}.name is required", f"{path}.name")
    desc = t.get("description") if isinstance(t.get("description"), str) else None
    pd: dict[str, Any] = {}
    if namespace:
        pd["namespace"], pd["name"] = namespace, name
    if t.get("type") == "custom":
        if isinstance(t.get("format"), dict):
            pd["format"] = t["format"]
        return ir.Tool(name=flat_tool_name(namespace, name), description=desc, kind="custom",
                       provider_data={PROTOCOL: pd} if pd else {})
    params = t.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise _bad(f"{path}.parameters must be an object", f"{path}.parameters")
    tool = ir.Tool(name=flat_tool_name(namespace, name), description=desc,
                   strict=t.get("strict") if isinstance(t.get("strict"), bool) else None,
                   provider_data={PROTOCOL: pd} if pd else {})
    if params:
        tool.parameters = params
    return tool


def _decode_tool_choice(req: ir.Request, choice: Any, parallel: Any) -> None:
    par = parallel if isinstance(parallel, bool) else None
    if choice is None:
        if par is not None:
            req.tool_choice = ir.ToolChoice(mode="auto", parallel=par)
        return
    if choice in ("auto", "none", "required"):
        req.tool_choice = ir.ToolChoice(mode=choice, parallel=par)
        return
    if not isinstance(choice, dict):
        raise _bad("tool_choice must be none, auto, required or an object", "tool_choice")
    kind = choice.get("type")
    if kind in ("function", "custom"):
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise _bad("tool_choice.name is required", "tool_choice.name")
        req.tool_choice = ir.ToolChoice(mode="tool", name=flat_tool_name(choice.get("namespace"), name), parallel=par)
    elif kind == "allowed_tools":
        mode = "required" if choice.get("mode") == "required" else "auto"
        allowed = {flat_tool_name(t.get("namespace"), t["name"])
                   for t in choice.get("tools") or [] if isinstance(t, dict) and isinstance(t.get("name"), str)}
        # IR has no allow-list: restrict the tool list instead (protocols.md 5.5)
        req.tools = [t for t in req.tools if t.name in allowed]
        req.tool_choice = ir.ToolChoice(mode=mode if req.tools else "none", parallel=par)
    else:
        # forcing a hosted tool: the hosted tool itself is dropped, so let the model choose
        req.tool_choice = ir.ToolChoice(mode="auto", parallel=par)


# ---------------------------------------------------------------- knobs


def _decode_sampling(req: ir.Request, body: dict[str, Any]) -> None:
    mot = body.get("max_output_tokens")
    if mot is not None:
        if not isinstance(mot, int) or isinstance(mot, bool) or mot < 1:
            raise _bad("max_output_tokens must be a positive integer", "max_output_tokens")
        req.max_tokens = mot
    for key, attr in (("temperature", "temperature"), ("top_p", "top_p")):
        v = body.get(key)
        if v is not None:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise _bad(f"{key} must be a number", key)
            setattr(req, attr, float(v))
    user = body.get("safety_identifier") or body.get("user")
    if isinstance(user, str):
        req.user = user


def _decode_reasoning(req: ir.Request, reasoning: Any) -> None:
    if reasoning is None:
        return
    if not isinstance(reasoning, dict):
        raise _bad("reasoning must be an object", "reasoning")
    effort = reasoning.get("effort")
    if effort is not None and effort not in _EFFORTS:
        raise _bad(f"reasoning.effort must be one of {', '.join(sorted(_EFFORTS))}", "reasoning.effort")
    summary = reasoning.get("summary", reasoning.get("generate_summary"))
    include = summary is not None and summary != "none"
    if effort == "none":
        req.reasoning = ir.Reasoning(enabled=False, effort="none", include_thoughts=False)
    else:
        # Codex sends {"summary":"auto"} alone: reasoning on, model-default effort
        req.reasoning = ir.Reasoning(enabled=True, effort=effort, include_thoughts=include)


def _decode_text(req: ir.Request, text: Any) -> None:
    if text is None:
        return
    if not isinstance(text, dict):
        raise _bad("text must be an object", "text")
    fmt = text.get("format")
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise _bad("text.format must be an object", "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return
    if kind == "json_object":
        req.response_format = ir.ResponseFormat(type="json_object")
    elif kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise _bad("text.format.schema is required for json_schema", "text.format.schema")
        req.response_format = ir.ResponseFormat(
            type="json_schema", schema=schema, name=fmt.get("name") if isinstance(fmt.get("name"), str) else None,
            strict=fmt.get("strict") if isinstance(fmt.get("strict"), bool) else None,
        )
    else:
        raise _bad("text.format.type must be text, json_object or json_schema", "text.format.type")
