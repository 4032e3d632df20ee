"""A loopback fake of the Gemini Developer API for tests (docs/dev/fakes.md).

It answers ``generateContent``, ``streamGenerateContent`` (SSE with CRLF
framing for ``alt=sse``, else a streamed JSON array) and ``countTokens`` under
``/v1beta`` and ``/v1``.  Answers are hand-written wire bytes, never built by
cheapproxy's codecs, so a codec bug cannot hide itself.  Requests the real API
would refuse (and that translation bugs produce) get a native 400.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from typing import Any

from aiohttp import web

SECRET = "upstream-secret"
RESPONSE_ID = "fake-gemini-resp-1"

_TOP_KEYS = {"contents", "systemInstruction", "tools", "toolConfig", "safetySettings", "generationConfig",
             "cachedContent", "labels", "model"}
_GEN_KEYS = {"maxOutputTokens", "temperature", "topP", "topK", "candidateCount", "stopSequences", "presencePenalty",
             "frequencyPenalty", "seed", "responseLogprobs", "logprobs", "responseMimeType", "responseSchema",
             "responseJsonSchema", "responseModalities", "mediaResolution", "speechConfig", "thinkingConfig"}
_DATA_KEYS = {"text", "inlineData", "fileData", "functionCall", "functionResponse", "executableCode",
              "codeExecutionResult"}
_PART_EXTRA = {"thought", "thoughtSignature", "videoMetadata", "mediaResolution"}
# keys the OpenAPI-subset `parameters` Schema does not know (pitfall 9)
_SCHEMA_UNKNOWN = {"$schema", "additionalProperties", "const", "propertyNames", "$ref", "$defs", "definitions",
                   "exclusiveMinimum", "exclusiveMaximum", "patternProperties", "oneOf", "allOf", "not"}
_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_.:-]{0,127}$")
_FILE_URI = ("https://generativelanguage.googleapis.com/", "gs://", "https://www.youtube.com/", "https://youtu.be/")


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def _get(obj: dict[str, Any], key: str) -> Any:
    v = obj.get(key)
    return obj.get(_snake(key)) if v is None else v


def _keys(obj: dict[str, Any]) -> set[str]:
    """Field names with snake_case spellings folded to camelCase (proto JSON
    accepts both)."""
    out = set()
    for k in obj:
        head, *rest = k.split("_")
        out.add(head + "".join(w[:1].upper() + w[1:] for w in rest))
    return out


class Invalid(Exception):
    def __init__(self, message: str, code: int = 400, status: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.message, self.code, self.status = message, code, status


# ---------------------------------------------------------------- wire bytes


def _error_bytes(code: int, status: str, message: str) -> bytes:
    # Google pretty-prints error bodies
    return (
        '{\n  "error": {\n    "code": %d,\n    "message": %s,\n    "status": "%s"\n  }\n}\n'
        % (code, json.dumps(message), status)
    ).encode()


def _error(code: int, status: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=code, body=_error_bytes(code, status, message),
                        content_type="application/json", headers=headers)


def _usage(cand: int, thoughts: int) -> str:
    th = ', "thoughtsTokenCount": %d' % thoughts if thoughts else ""
    return ('"usageMetadata": {"promptTokenCount": 15, "candidatesTokenCount": %d, "totalTokenCount": %d, '
            '"cachedContentTokenCount": 5, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 15}]%s}'
            % (cand, 15 + cand + thoughts, th))


def _chunk(parts: list[str], model: str, cand: int, thoughts: int, finish: str | None) -> str:
    fin = ', "finishReason": "%s"' % finish if finish else ""
    return ('{"candidates": [{"content": {"parts": [%s], "role": "model"}%s, "index": 0}], %s, '
            '"modelVersion": "%s", "responseId": "%s"}'
            % (", ".join(parts), fin, _usage(cand, thoughts), model, RESPONSE_ID))


def _text(t: str) -> str:
    return '{"text": %s}' % json.dumps(t)


def _call(name: str, args: str, signed: bool) -> str:
    sig = ', "thoughtSignature": "c2lnLWdlbWluaQ=="' if signed else ""
    return '{"functionCall": {"name": "%s", "args": %s}%s}' % (name, args, sig)


# ---------------------------------------------------------------- validation


def _check_schema(schema: Any, where: str) -> None:
    if isinstance(schema, dict):
        for k, v in schema.items():
            if k in _SCHEMA_UNKNOWN:
                raise Invalid(f'Invalid JSON payload received. Unknown name "{k}" at \'{where}\': Cannot find field.')
            if k == "type" and isinstance(v, list):
                raise Invalid(f"Invalid JSON payload received. Proto field is not repeating, cannot start list. ({where}.type)")
            if k == "properties" and isinstance(v, dict):
                for name, sub in v.items():
                    _check_schema(sub, f"{where}.properties[{name}]")
            elif k in ("items", "anyOf"):
                _check_schema(v, f"{where}.{k}")
    elif isinstance(schema, list):
        for s in schema:
            _check_schema(s, where)


def _check_part(part: Any, role: str, where: str) -> None:
    if not isinstance(part, dict):
        raise Invalid(f"Invalid JSON payload received. {where} must be an object.")
    data = _keys(part) & _DATA_KEYS
    unknown = _keys(part) - _DATA_KEYS - _PART_EXTRA
    if unknown:
        raise Invalid(f'Invalid JSON payload received. Unknown name "{sorted(unknown)[0]}" at \'{where}\': Cannot find field.')
    if len(data) != 1:
        if not data and _get(part, "thoughtSignature"):
            return
        raise Invalid(f"{where}: a part must hold exactly one of text, inlineData, fileData, functionCall, functionResponse.")
    if "text" in data:
        if not isinstance(part["text"], str):
            raise Invalid(f"Invalid value at '{where}.text' (TYPE_STRING)")
        if not part["text"] and not _get(part, "thoughtSignature"):
            raise Invalid("Unable to submit request because it has an empty text parameter. Add a value to the parameter and try again.")
    if "inlineData" in data:
        inline = _get(part, "inlineData")
        mime, blob = _get(inline, "mimeType"), inline.get("data") if isinstance(inline, dict) else None
        if not isinstance(mime, str) or not isinstance(blob, str) or not blob:
            raise Invalid(f"{where}.inlineData: mimeType and data are required.")
        if blob.startswith("data:"):
            raise Invalid(f"Invalid value at '{where}.inline_data.data' (TYPE_BYTES), Base64 decoding failed")
        try:
            base64.b64decode(blob.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            raise Invalid(f"Invalid value at '{where}.inline_data.data' (TYPE_BYTES), Base64 decoding failed") from None
        if mime == "image/gif":
            raise Invalid("Unsupported MIME type: image/gif")
    if "fileData" in data:
        uri = _get(_get(part, "fileData") or {}, "fileUri")
        if not isinstance(uri, str) or not uri.startswith(_FILE_URI):
            raise Invalid(f"{where}.fileData: Invalid or unsupported file uri: {uri}")
    if "functionCall" in data:
        fc = _get(part, "functionCall")
        if role != "model":
            raise Invalid(f"{where}: functionCall parts must be in a model turn.")
        if not isinstance(fc, dict) or not isinstance(fc.get("name"), str) or not fc["name"]:
            raise Invalid(f"{where}.functionCall.name is required.")
        if "args" in fc and not isinstance(fc["args"], dict):
            raise Invalid(f"Invalid value at '{where}.function_call.args' (type.googleapis.com/google.protobuf.Struct)")
    if "functionResponse" in data:
        fr = _get(part, "functionResponse")
        if role != "user":
            raise Invalid(f"{where}: functionResponse parts must be in a user turn.")
        if not isinstance(fr, dict) or not isinstance(fr.get("name"), str) or not fr["name"]:
            raise Invalid(f"{where}.functionResponse.name is required.")
        if not isinstance(fr.get("response"), dict):
            raise Invalid(f"Invalid value at '{where}.function_response.response' (type.googleapis.com/google.protobuf.Struct)")


def _parts_of(content: dict[str, Any], key: str) -> list[dict[str, Any]]:
    return [_get(p, key) for p in content.get("parts", []) if isinstance(p, dict) and _get(p, key) is not None]


def _check_contents(contents: Any, model: str) -> None:
    if not isinstance(contents, list) or not contents:
        raise Invalid("* GenerateContentRequest.contents: contents is not specified")
    for i, c in enumerate(contents):
        if not isinstance(c, dict):
            raise Invalid(f"Invalid JSON payload received. contents[{i}] must be an object.")
        role = c.get("role", "user")
        if role not in ("user", "model"):
            raise Invalid("Please use a valid role: user, model.")
        parts = c.get("parts")
        if not isinstance(parts, list) or not parts:
            raise Invalid(f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty.")
        for j, p in enumerate(parts):
            _check_part(p, role, f"contents[{i}].parts[{j}]")
    # call / response pairing
    for i, c in enumerate(contents):
        responses = _parts_of(c, "functionResponse")
        if c.get("role", "user") == "model":
            calls = _parts_of(c, "functionCall")
            if calls and i + 1 < len(contents):
                nxt = _parts_of(contents[i + 1], "functionResponse")
                if sorted(x["name"] for x in calls) != sorted(x["name"] for x in nxt):
                    raise Invalid("Please ensure that the number of function response parts is equal to the number "
                                  "of function call parts of the function call turn.")
        elif responses:
            prev = contents[i - 1] if i else None
            if prev is None or prev.get("role") != "model" or not _parts_of(prev, "functionCall"):
                raise Invalid("Please ensure that function response turn comes immediately after a function call turn.")
    if model.startswith("gemini-3"):
        # Gemini 3 enforces signatures on the first call of each step of the current turn
        start = max((i for i, c in enumerate(contents)
                     if c.get("role", "user") == "user" and _parts_of(c, "text")), default=0)
        for i in range(start, len(contents)):
            c = contents[i]
            if c.get("role") != "model":
                continue
            first = next((p for p in c["parts"] if _get(p, "functionCall") is not None), None)
            if first is not None and not _get(first, "thoughtSignature"):
                raise Invalid(f"Function call is missing a thought_signature in functionCall parts. This is required "
                              f"for tools to work correctly. Additional data, function call `default_api:"
                              f"{_get(first, 'functionCall')['name']}` , position {i}.")


def _check_tools(body: dict[str, Any]) -> None:
    declared: set[str] = set()
    tools = _get(body, "tools") or []
    if not isinstance(tools, list):
        raise Invalid("Invalid JSON payload received. tools must be a list.")
    for i, tool in enumerate(tools):
        for j, d in enumerate(_get(tool, "functionDeclarations") or [] if isinstance(tool, dict) else []):
            where = f"tools[{i}].function_declarations[{j}]"
            if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not _NAME_RE.match(d["name"]):
                raise Invalid(f"* GenerateContentRequest.{where}.name: Invalid function name.")
            if _get(d, "parameters") is not None and _get(d, "parametersJsonSchema") is not None:
                raise Invalid(f"{where}: parameters and parameters_json_schema are mutually exclusive.")
            _check_schema(_get(d, "parameters"), f"{where}.parameters")
            declared.add(d["name"])
    fcc = _get(_get(body, "toolConfig") or {}, "functionCallingConfig")
    if isinstance(fcc, dict):
        mode = fcc.get("mode", "AUTO")
        if mode not in ("AUTO", "ANY", "NONE", "VALIDATED", "MODE_UNSPECIFIED"):
            raise Invalid(f"Invalid value at 'tool_config.function_calling_config.mode', \"{mode}\"")
        allowed = _get(fcc, "allowedFunctionNames")
        if allowed:
            if mode not in ("ANY", "VALIDATED"):
                raise Invalid("allowed_function_names should only be set when the Function calling mode is ANY.")
            missing = [n for n in allowed if n not in declared]
            if missing:
                raise Invalid(f"allowed_function_names contains an undeclared function: {missing[0]}")


def _check_generation(gc: Any) -> None:
    if gc is None:
        return
    if not isinstance(gc, dict):
        raise Invalid("Invalid JSON payload received. generation_config must be an object.")
    unknown = _keys(gc) - _GEN_KEYS
    if unknown:
        raise Invalid(f'Invalid JSON payload received. Unknown name "{sorted(unknown)[0]}" at \'generation_config\': Cannot find field.')
    for key in ("temperature", "topP"):
        v = _get(gc, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise Invalid(f"Invalid value at 'generation_config.{_snake(key)}' (TYPE_FLOAT)")
    for key in ("maxOutputTokens", "topK", "candidateCount", "seed"):
        v = _get(gc, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v)):
            raise Invalid(f"Invalid value at 'generation_config.{_snake(key)}' (TYPE_INT32)")
    stops = _get(gc, "stopSequences")
    if stops is not None and (not isinstance(stops, list) or len(stops) > 5):
        raise Invalid("generation_config.stop_sequences: at most 5 stop sequences are allowed.")
    mime = _get(gc, "responseMimeType")
    if (_get(gc, "responseJsonSchema") is not None or _get(gc, "responseSchema") is not None) and mime != "application/json" and mime != "text/x.enum":
        raise Invalid("response_mime_type must be application/json when a response schema is set.")
    tc = _get(gc, "thinkingConfig")
    if isinstance(tc, dict):
        if _get(tc, "thinkingBudget") is not None and _get(tc, "thinkingLevel") is not None:
            raise Invalid("thinking_budget and thinking_level are mutually exclusive.")
        budget = _get(tc, "thinkingBudget")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
            raise Invalid("Invalid value at 'generation_config.thinking_config.thinking_budget' (TYPE_INT32)")


def _check_generate(body: Any, model: str) -> None:
    if not isinstance(body, dict):
        raise Invalid("Invalid JSON payload received. Expected an object.")
    unknown = _keys(body) - _TOP_KEYS
    if unknown:
        raise Invalid(f'Invalid JSON payload received. Unknown name "{sorted(unknown)[0]}": Cannot find field.')
    _check_contents(body.get("contents"), model)
    si = _get(body, "systemInstruction")
    if si is not None:
        if not isinstance(si, dict) or not isinstance(si.get("parts"), list) or not all(
                isinstance(p, dict) and isinstance(p.get("text"), str) for p in si["parts"]):
            raise Invalid("Invalid value at 'system_instruction': parts must be text parts.")
    _check_tools(body)
    _check_generation(_get(body, "generationConfig"))


# ---------------------------------------------------------------- scenarios


def _texts(content: dict[str, Any]) -> list[str]:
    return [p["text"] for p in content.get("parts", []) if isinstance(p, dict) and isinstance(p.get("text"), str)
            and not p.get("thought")]


def _first_image(body: dict[str, Any]) -> str:
    for c in body.get("contents", []):
        for p in c.get("parts", []):
            for key in ("inlineData", "fileData"):
                media = _get(p, key) if isinstance(p, dict) else None
                mime = _get(media, "mimeType") if isinstance(media, dict) else None
                if isinstance(mime, str) and mime.startswith("image/"):
                    return mime
    return "none"


def _answer(body: dict[str, Any], model: str) -> tuple[str, list[list[str]], int, int, str]:
    """(scenario, chunks of parts, final candidates count, thoughts, finish)."""
    users = [c for c in body["contents"] if c.get("role", "user") == "user"]
    last = users[-1] if users else {"parts": []}
    tags = " ".join(_texts(last))
    responses = _parts_of(last, "functionResponse")
    gemini3 = model.startswith("gemini-3")
    for tag in ("[error400]", "[error500]", "[error429]"):
        if tag in tags:
            return tag, [], 0, 0, ""
    if responses and not tags:
        resp = responses[0]["response"]
        value = resp.get("output", resp.get("result", resp.get("error", resp)))
        text = value if isinstance(value, str) else json.dumps(value)
        return "tool_result", [[_text("Tool said: " + text)]], 7, 0, "STOP"
    if "[echo]" in tags:
        si = _get(body, "systemInstruction") or {}
        joined = "|".join(p.get("text", "") for p in si.get("parts", []))
        return "echo", [[_text("system: " + joined)]], 7, 0, "STOP"
    if "[image]" in tags:
        return "image", [[_text("image: " + _first_image(body))]], 7, 0, "STOP"
    if "[json]" in tags:
        return "json", [[_text('{"answer": 42}')]], 7, 0, "STOP"
    if "[length]" in tags:
        return "length", [[_text("The answer")], [_text(" is")]], 7, 0, "MAX_TOKENS"
    if "[think]" in tags:
        thought = '{"text": "Let me think.", "thought": true, "thoughtSignature": "c2lnLWdlbWluaQ=="}'
        return "think", [[thought], [_text("The answer")], [_text(" is")], [_text(" 42.")]], 4, 3, "STOP"
    if "[parallel]" in tags:
        return "parallel", [[_call("get_weather", '{"city": "Paris"}', gemini3)],
                            [_call("get_time", '{"tz": "Europe/Paris"}', False)]], 7, 0, "STOP"
    if "[tool]" in tags:
        return "tool", [[_call("get_weather", '{"city": "Paris"}', gemini3)]], 7, 0, "STOP"
    if "[cut]" in tags:
        return "cut", [[_text("The answer")], [_text(" is")], [_text(" 42.")]], 7, 0, "STOP"
    return "text", [[_text("The answer")], [_text(" is")], [_text(" 42.")]], 7, 0, "STOP"


def _count_tokens(body: dict[str, Any]) -> int:
    """Deterministic stand-in: whitespace-separated words of every text, plus
    one per non-text part."""
    n = 0
    si = _get(body, "systemInstruction") or {}
    for p in si.get("parts", []) if isinstance(si, dict) else []:
        n += len(str(p.get("text", "")).split())
    for c in body.get("contents", []):
        for p in c.get("parts", []):
            n += len(p["text"].split()) if isinstance(p.get("text"), str) else 1
    return n


# ---------------------------------------------------------------- handlers


def make_app(log: list[dict[str, Any]] | None = None) -> web.Application:
    """The fake Gemini API.  Every request is appended to ``log``."""
    records = log if log is not None else []

    async def handle(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        records.append({"method": request.method, "path": request.path, "query": dict(request.query),
                        "headers": {k.lower(): v for k, v in request.headers.items()}, "body": body})
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if key != SECRET:
            return _error(401, "UNAUTHENTICATED", "API key not valid. Please pass a valid API key.")
        if body is None:
            return _error(400, "INVALID_ARGUMENT", "Invalid JSON payload received. Unexpected token.")
        model = request.match_info["model"]
        method = request.match_info["method"]
        try:
            if method == "countTokens":
                return _count(body, model)
            if method not in ("generateContent", "streamGenerateContent"):
                return _error(404, "NOT_FOUND", f"Method {method} not found.")
            _check_generate(body, model)
        except Invalid as exc:
            return _error(exc.code, exc.status, exc.message)
        scenario, chunks, cand, thoughts, finish = _answer(body, model)
        if scenario == "[error400]":
            return _error(400, "INVALID_ARGUMENT", "bad request from fake")
        if scenario == "[error500]":
            return _error(500, "INTERNAL", "An internal error has occurred.")
        if scenario == "[error429]":
            return _error(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota).",
                          headers={"retry-after": "1"})
        if method == "generateContent":
            parts = [p for chunk in chunks for p in chunk]
            text = _chunk(parts, model, cand, thoughts, finish)
            return web.Response(body=text.encode(), content_type="application/json")
        return await _stream(request, scenario, chunks, model, cand, thoughts, finish)

    app = web.Application()
    for version in ("v1beta", "v1"):
        app.router.add_post(f"/{version}/models/{{model}}:{{method:[A-Za-z]+}}", handle)
    return app


def _count(body: Any, model: str) -> web.Response:
    if not isinstance(body, dict):
        raise Invalid("Invalid JSON payload received. Expected an object.")
    inner = _get(body, "generateContentRequest")
    if inner is not None and "contents" in body:
        raise Invalid("contents and generate_content_request are mutually exclusive.")
    if inner is not None:
        if not isinstance(inner, dict) or not str(inner.get("model", "")).startswith("models/"):
            raise Invalid("* CountTokensRequest.generate_content_request.model: model is required (models/{model}).")
        target = {k: v for k, v in inner.items() if k != "model"}
    else:
        unknown = _keys(body) - {"contents"}
        if unknown:
            raise Invalid(f'Invalid JSON payload received. Unknown name "{sorted(unknown)[0]}": Cannot find field.')
        target = body
    _check_generate(target, model)
    return web.Response(body=b'{\n  "totalTokens": %d\n}\n' % _count_tokens(target), content_type="application/json")


def _progress(chunks: list[list[str]], cand: int, thoughts: int) -> list[tuple[int, int]]:
    """Cumulative (candidates, thoughts) per chunk: thoughts come first, the
    candidate count reaches its final value on the last chunk."""
    out = []
    n = len(chunks)
    for i in range(n):
        done = (i + 1) / n
        out.append((cand if i == n - 1 else int(cand * done), thoughts))
    return out


async def _stream(request: web.Request, scenario: str, chunks: list[list[str]], model: str,
                  cand: int, thoughts: int, finish: str) -> web.StreamResponse:
    sse = request.query.get("alt") == "sse"
    resp = web.StreamResponse(headers={
        "Content-Type": "text/event-stream" if sse else "application/json; charset=UTF-8",
    })
    await resp.prepare(request)
    if not sse:
        await resp.write(b"[")
    progress = _progress(chunks, cand, thoughts)
    for i, parts in enumerate(chunks):
        last = i == len(chunks) - 1
        c, t = progress[i]
        text = _chunk(parts, model, c, t, finish if last else None)
        if sse:
            await resp.write(b"data: " + text.encode() + b"\r\n\r\n")
        else:
            await resp.write((b"" if i == 0 else b",\r\n") + text.encode())
        if scenario == "cut":
            await asyncio.sleep(0.01)
            assert request.transport is not None
            request.transport.close()  # the connection drops: no finishReason ever comes
            return resp
    if not sse:
        await resp.write(b"]")
    await resp.write_eof()
    return resp
