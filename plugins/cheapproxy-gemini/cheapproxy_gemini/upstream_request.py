"""Upstream side, request: ir.Request -> a Gemini ``generateContent`` body
(camelCase).  Tool schemas go as ``parametersJsonSchema`` (pitfall 9);
system messages fold into ``systemInstruction``; foreign tool-call history gets
the signature sentinel (pitfall 8); the gateway never fetches image URLs."""

from __future__ import annotations

import base64
from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.errors import ProxyError

from .wire import PROTOCOL, SKIP_SIGNATURE

CUSTOM_TOOL_SCHEMA = {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}

EFFORT_BUDGET = {"minimal": 1024, "low": 1024, "medium": 4096, "high": 16384, "xhigh": 32768, "max": 64000}
EFFORT_LEVEL = {"minimal": "MINIMAL", "low": "LOW", "medium": "MEDIUM", "high": "HIGH", "xhigh": "HIGH", "max": "HIGH"}

# URIs Gemini resolves itself (Files API, Cloud Storage, YouTube): sent as
# fileData.  Anything else would have to be fetched by the gateway (SSRF).
_GOOGLE_URI_PREFIXES = (
    "https://generativelanguage.googleapis.com/",
    "gs://",
    "https://www.youtube.com/",
    "https://youtube.com/",
    "https://youtu.be/",
)

_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
          (b"RIFF", "image/webp"), (b"%PDF", "application/pdf"))


def _sniff(data: str) -> str | None:
    try:
        head = base64.b64decode(data[:16] + "=" * (-len(data[:16]) % 4))
    except ValueError:
        return None
    for magic, mime in _MAGIC:
        if head.startswith(magic):
            return mime
    return None


def parse_arguments(arguments: str, kind: str = "function") -> dict[str, Any]:
    """Tool-call arguments (JSON text) -> the args object Gemini wants; text
    that is not a JSON object is wrapped as ``{"input": ...}``, never fatal."""
    if kind == "custom":
        return {"input": arguments}
    try:
        value = orjson.loads(arguments) if arguments else {}
    except orjson.JSONDecodeError:
        return {"input": arguments}
    return value if isinstance(value, dict) else {"input": value}


def _bad(message: str, param: str) -> ProxyError:
    return ProxyError("invalid_request", message, param=param)


def _data_url(url: str, param: str) -> tuple[str, str]:
    head, sep, data = url.partition(",")
    if not sep or ";base64" not in head:
        raise _bad(f"{param}: only base64 data URLs are supported", param)
    return head[5:].split(";")[0], data


def _media_part(part: ir.ImagePart | ir.FilePart, param: str) -> dict[str, Any]:
    is_image = isinstance(part, ir.ImagePart)
    if isinstance(part, ir.FilePart) and part.file_id and not (part.data or part.url):
        raise _bad(f"{param}: file ids are not supported by gemini; send the file inline", param)
    mime, data = part.media_type, part.data
    if data is None and part.url and part.url.startswith("data:"):
        mime, data = _data_url(part.url, param)
        mime = mime or part.media_type
    if data is not None:
        mime = mime or _sniff(data) or ("image/jpeg" if is_image else "application/pdf")
        if mime == "image/gif":
            # Gemini rejects GIF (pitfall 10); converting would need an image library
            raise _bad(f"{param}: image/gif is not supported by gemini (use PNG, JPEG or WEBP)", param)
        return {"inlineData": {"mimeType": mime, "data": data}}
    url = part.url or ""
    if url.startswith(_GOOGLE_URI_PREFIXES):
        fd: dict[str, Any] = {"fileUri": url}
        if mime:
            fd["mimeType"] = mime
        return {"fileData": fd}
    what = "image" if is_image else "file"
    raise _bad(
        f"{param}: an {what} URL is not supported by gemini (the gateway does not fetch URLs); "
        f"send the {what} inline as base64 data",
        param,
    )


def _signed(d: dict[str, Any], pd: dict[str, Any]) -> dict[str, Any]:
    sig = (pd.get(PROTOCOL) or {}).get("thoughtSignature")
    if sig:
        d["thoughtSignature"] = sig
    return d


def _tool_result(part: ir.ToolResultPart, names: dict[str, str], param: str) -> list[dict[str, Any]]:
    name = part.name or names.get(part.tool_call_id)
    if not name:
        raise _bad(f"{param}: tool result {part.tool_call_id!r} has no matching tool call (gemini needs the function name)", param)
    texts, extra = [], []
    for j, sub in enumerate(part.content):
        if isinstance(sub, ir.TextPart):
            texts.append(sub.text)
        elif isinstance(sub, (ir.ImagePart, ir.FilePart)):
            # functionResponse.parts support varies: images go as separate parts
            extra.append(_media_part(sub, f"{param}.content[{j}]"))
    text = "\n".join(texts)
    fr = {"id": part.tool_call_id, "name": name, "response": {"error" if part.is_error else "output": text}}
    return [{"functionResponse": fr}, *extra]


def _parts(msg: ir.Message, names: dict[str, str], param: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for j, part in enumerate(msg.content):
        p = f"{param}.content[{j}]"
        if isinstance(part, ir.TextPart):
            if part.text or (part.provider_data.get(PROTOCOL) or {}).get("thoughtSignature"):
                out.append(_signed({"text": part.text}, part.provider_data))
        elif isinstance(part, ir.ReasoningPart):
            # only Gemini's own thoughts go back; foreign reasoning is dropped (5.10)
            if part.signature_protocol == PROTOCOL and part.signature:
                out.append({"text": part.text, "thought": True, "thoughtSignature": part.signature})
        elif isinstance(part, ir.ToolCallPart):
            fc = {"id": part.id, "name": part.name, "args": parse_arguments(part.arguments, part.kind)}
            out.append(_signed({"functionCall": fc}, part.provider_data))
        elif isinstance(part, ir.ToolResultPart):
            out.extend(_tool_result(part, names, p))
        elif isinstance(part, (ir.ImagePart, ir.FilePart)):
            out.append(_media_part(part, p))
    return out


def _add_sentinels(contents: list[dict[str, Any]]) -> None:
    """The first functionCall of every model step needs a thoughtSignature;
    history Gemini did not produce gets the documented skip sentinel."""
    for content in contents:
        if content["role"] != "model":
            continue
        for part in content["parts"]:
            if "functionCall" in part:
                part.setdefault("thoughtSignature", SKIP_SIGNATURE)
                break


def encode_contents(request: ir.Request) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(contents, systemInstruction parts).  Mid-conversation system messages
    are folded into the system instruction in order (position is lost)."""
    system = [{"text": p.text} for p in request.system if p.text]
    names: dict[str, str] = {}
    contents: list[dict[str, Any]] = []
    for i, msg in enumerate(request.messages):
        if msg.role == "system":
            system.extend({"text": p.text} for p in msg.content if isinstance(p, ir.TextPart) and p.text)
            continue
        for part in msg.content:
            if isinstance(part, ir.ToolCallPart):
                names[part.id] = part.name
        parts = _parts(msg, names, f"messages[{i}]")
        if not parts:
            continue
        role = "model" if msg.role == "assistant" else "user"
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)  # one turn per step (5.1)
        else:
            contents.append({"role": role, "parts": parts})
    _add_sentinels(contents)
    return contents, system


def _tools(request: ir.Request) -> list[dict[str, Any]]:
    decls = []
    for t in request.tools:
        d: dict[str, Any] = {"name": t.name}
        if t.description:
            d["description"] = t.description
        d["parametersJsonSchema"] = CUSTOM_TOOL_SCHEMA if t.kind == "custom" else t.parameters
        decls.append(d)
    tools: list[dict[str, Any]] = [{"functionDeclarations": decls}] if decls else []
    tools.extend((request.provider_data.get(PROTOCOL) or {}).get("builtin_tools", []))
    return tools


def _tool_config(choice: ir.ToolChoice | None) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice.mode == "none":
        cfg: dict[str, Any] = {"mode": "NONE"}
    elif choice.mode == "required":
        cfg = {"mode": "ANY"}
    elif choice.mode == "tool" and choice.name:
        cfg = {"mode": "ANY", "allowedFunctionNames": [choice.name]}
    else:
        cfg = {"mode": "AUTO"}
    return {"functionCallingConfig": cfg}  # parallel=False has no equivalent


def clamp_budget(budget: int, model: str) -> int:
    """Gemini rejects budgets outside the model's range (Pro 128..32768,
    Flash 0..24576, Flash-Lite 512..24576); Anthropic-sized budgets are common."""
    if "flash" in model:
        budget = min(budget, 24576)
        return max(budget, 512) if "lite" in model else budget
    if "pro" in model:
        return max(128, min(budget, 32768))
    return budget


def thinking_config(reasoning: ir.Reasoning | None, upstream_model: str) -> dict[str, Any] | None:
    """IR reasoning -> thinkingConfig.  Gemini 3 takes a thinkingLevel for an
    effort; an explicit budget is always sent as thinkingBudget."""
    if reasoning is None:
        return None
    if not reasoning.enabled or reasoning.effort == "none":
        return {"thinkingBudget": 0}
    cfg: dict[str, Any] = {}
    model = upstream_model.removeprefix("models/")
    gemini3 = model.startswith("gemini-3")
    if reasoning.budget_tokens:
        cfg["thinkingBudget"] = clamp_budget(reasoning.budget_tokens, model)
    elif reasoning.effort in EFFORT_BUDGET:
        if gemini3:
            cfg["thinkingLevel"] = EFFORT_LEVEL[reasoning.effort]
        else:
            cfg["thinkingBudget"] = clamp_budget(EFFORT_BUDGET[reasoning.effort], model)
    elif reasoning.adaptive and not gemini3:
        cfg["thinkingBudget"] = -1  # dynamic
    if reasoning.include_thoughts:
        cfg["includeThoughts"] = True
    return cfg


def _generation_config(request: ir.Request, upstream_model: str) -> dict[str, Any]:
    gc: dict[str, Any] = {}
    if request.max_tokens is not None:
        gc["maxOutputTokens"] = request.max_tokens
    if request.temperature is not None:
        gc["temperature"] = request.temperature
    if request.top_p is not None:
        gc["topP"] = request.top_p
    if request.top_k is not None:
        gc["topK"] = request.top_k
    if request.stop:
        gc["stopSequences"] = list(request.stop)
    if request.n is not None and request.n > 1:
        # Gemini can, but the IR carries one candidate: the others would be lost
        raise _bad("n > 1 (several candidates) is not supported by gemini through this gateway", "n")
    if request.seed is not None:
        gc["seed"] = request.seed
    rf = request.response_format
    if rf is not None and rf.type != "text":
        gc["responseMimeType"] = "application/json"
        if rf.type == "json_schema" and rf.schema is not None:
            gc["responseJsonSchema"] = rf.schema
    tc = thinking_config(request.reasoning, upstream_model)
    if tc:
        gc["thinkingConfig"] = tc
    gc.update((request.provider_data.get(PROTOCOL) or {}).get("generationConfig", {}))
    return gc


def encode_generate_body(request: ir.Request, upstream_model: str) -> dict[str, Any]:
    """The full generateContent body (the model goes in the path)."""
    contents, system = encode_contents(request)
    if not contents:
        raise _bad("the request has no user or assistant content to send", "messages")
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": system}
    tools = _tools(request)
    if tools:
        body["tools"] = tools
    tool_config = _tool_config(request.tool_choice) if request.tools else None
    if tool_config:
        body["toolConfig"] = tool_config
    gc = _generation_config(request, upstream_model)
    if gc:
        body["generationConfig"] = gc
    extras = request.provider_data.get(PROTOCOL) or {}
    for key in ("safetySettings", "cachedContent"):
        if key in extras:
            body[key] = extras[key]
    return body
