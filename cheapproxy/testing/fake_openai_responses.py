"""Loopback fake of the OpenAI Responses API (tests).

Speaks the wire format of protocols.md section 2 with bodies written out here
by hand (never built by cheapproxy's codecs, so a codec bug cannot hide
itself).  The answer is picked from tags in the last user turn, as described
in docs/dev/fakes.md.  Serve it under a base URL ending in ``/v1``
(``POST /v1/responses``).

Protocol-specific details:

* ``[think]`` answers a reasoning item (summary ``Let me think.``,
  ``encrypted_content`` ``enc-responses``) before the text;
* ``[custom]`` (beyond fakes.md) answers one ``custom_tool_call`` named
  ``apply_patch`` whose raw input comes in two fragments;
* ``[cut]`` sends the first text delta and ends the body without a terminal
  event; ``[linger]`` answers the text, writes a ``data: [DONE]`` with the
  terminal event and keeps the body open (at most 30 s) until the peer hangs
  up; ``[image]`` reports the media type of the first ``input_image``
  (``unknown`` when a URL has no recognisable extension).

Validation mirrors what the real API rejects and translation bugs produce:
unknown top-level parameters (``max_tokens``, ``stop``, ``messages`` ...),
Chat-style nested tools, strict schemas without ``additionalProperties:
false``, call outputs without their call (and calls without output),
assistant content parts other than ``output_text``/``refusal``, malformed
image data URLs, ``input_file`` data without ``filename``,
``max_output_tokens`` below 16.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import re
from typing import Any

from aiohttp import web

SECRET = "upstream-secret"
CREATED = 1700000000
RESP_ID = "resp_fake0001"
_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

# usage per fakes.md: uncached 10 + cached 5 = input 15; output 7 (3 reasoning with [think])
_INPUT, _CACHED, _OUTPUT = 15, 5, 7

_KNOWN_PARAMS = {
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "max_tool_calls",
    "max_output_tokens", "temperature", "top_p", "top_logprobs", "reasoning", "text", "stream", "stream_options",
    "store", "previous_response_id", "conversation", "include", "truncation", "prompt_cache_key", "metadata",
    "service_tier", "safety_identifier", "user", "background", "prompt", "client_metadata", "prompt_cache_retention",
}
_HOSTED_TOOLS = {"web_search", "web_search_preview", "file_search", "code_interpreter", "mcp", "image_generation",
                 "local_shell", "shell", "computer_use_preview", "apply_patch", "tool_search"}
_EFFORTS = {"none", "minimal", "low", "medium", "high", "xhigh", "max"}


class Invalid(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _error(status: int, message: str, etype: str, *, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": etype, "param": param, "code": code}}
    return web.Response(status=status, text=_dumps(body), content_type="application/json", headers=headers)


def _check_key(request: web.Request) -> web.Response | None:
    auth = request.headers.get("Authorization", "")
    if auth == f"Bearer {SECRET}":
        return None
    if not auth.startswith("Bearer "):
        return _error(401, "You didn't provide an API key. You need to provide your API key in an Authorization header "
                      "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).", "invalid_request_error")
    key = auth[7:]
    # the real API echoes a masked key; a gateway must not relay even that
    masked = key[:3] + "*" * max(len(key) - 7, 0) + key[-4:] if len(key) > 7 else "***"
    return _error(401, f"Incorrect API key provided: {masked}. You can find your API key at "
                  "https://platform.openai.com/account/api-keys.", "invalid_request_error", code="invalid_api_key")


# ---------------------------------------------------------------- validation


def _validate(body: dict[str, Any]) -> None:
    for key in body:
        if key not in _KNOWN_PARAMS:
            raise Invalid(f"Unknown parameter: '{key}'.", key)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise Invalid("Missing required parameter: 'model'.", "model")
    inp = body.get("input")
    if not isinstance(inp, (str, list)):
        raise Invalid("Missing required parameter: 'input'.", "input")
    mot = body.get("max_output_tokens")
    if mot is not None and (not isinstance(mot, int) or isinstance(mot, bool) or mot < 16):
        raise Invalid("Invalid 'max_output_tokens': integer below minimum value. Expected a value >= 16.",
                      "max_output_tokens")
    temp = body.get("temperature")
    if temp is not None and (not isinstance(temp, (int, float)) or not 0 <= temp <= 2):
        raise Invalid("Invalid 'temperature': decimal above maximum value. Expected a value <= 2.", "temperature")
    reasoning = body.get("reasoning")
    if reasoning is not None and (not isinstance(reasoning, dict) or reasoning.get("effort", "medium") not in _EFFORTS):
        raise Invalid("Invalid value for 'reasoning.effort'.", "reasoning.effort")
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema")):
        raise Invalid("Invalid value for 'text.format.type'.", "text.format.type")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and not (
        isinstance(fmt.get("name"), str) and isinstance(fmt.get("schema"), dict)
    ):
        raise Invalid("Missing required parameter: 'text.format.name'.", "text.format.name")
    _validate_tools(body.get("tools"))
    if isinstance(inp, list):
        _validate_items(inp)


def _validate_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise Invalid("Invalid type for 'tools': expected an array.", "tools")
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict):
            raise Invalid(f"Invalid type for '{where}': expected an object.", where)
        kind = t.get("type")
        if kind in _HOSTED_TOOLS:
            continue
        if kind == "namespace":
            _validate_tools(t.get("tools"))
            continue
        if kind not in ("function", "custom"):
            raise Invalid(f"Invalid value: '{kind}'. Supported values are: 'function', 'custom', 'namespace', "
                          "and hosted tool types.", f"{where}.type")
        if "function" in t:
            raise Invalid(f"Unknown parameter: '{where}.function'.", f"{where}.function")
        if not isinstance(t.get("name"), str) or not _NAME_RE.match(t["name"]):
            raise Invalid(f"Missing required parameter: '{where}.name'.", f"{where}.name")
        if kind == "function":
            params = t.get("parameters")
            if params is not None and not isinstance(params, dict):
                raise Invalid(f"Invalid type for '{where}.parameters': expected an object.", f"{where}.parameters")
            if t.get("strict") is True and isinstance(params, dict):
                props = params.get("properties") or {}
                if params.get("additionalProperties") is not False or set(params.get("required") or []) != set(props):
                    raise Invalid(f"Invalid schema for function '{t['name']}': In context=(), 'additionalProperties' "
                                  "is required to be supplied and to be false.", f"{where}.parameters")


def _validate_items(items: list[Any]) -> None:
    calls: dict[str, str] = {}
    answered: set[str] = set()
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise Invalid(f"Invalid type for '{where}': expected an object.", where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            _validate_message(item, where)
        elif kind in ("function_call", "custom_tool_call"):
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("name"), str):
                raise Invalid(f"Missing required parameter: '{where}.call_id'.", f"{where}.call_id")
            field = "arguments" if kind == "function_call" else "input"
            if not isinstance(item.get(field), str):
                raise Invalid(f"Invalid type for '{where}.{field}': expected a string, but got an object instead.",
                              f"{where}.{field}")
            calls[item["call_id"]] = kind
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = item.get("call_id")
            want = kind[: -len("_output")]
            if calls.get(call_id) != want:
                raise Invalid(f"No tool call found for {want.replace('_', ' ')} output with call_id {call_id}.",
                              f"{where}.call_id")
            out = item.get("output")
            if not isinstance(out, (str, list)):
                raise Invalid(f"Invalid type for '{where}.output': expected a string or an array.", f"{where}.output")
            if isinstance(out, list):
                for j, p in enumerate(out):
                    _validate_input_part(p, f"{where}.output[{j}]")
            answered.add(call_id)
        elif kind == "reasoning":
            if not isinstance(item.get("summary"), list):
                raise Invalid(f"Missing required parameter: '{where}.summary'.", f"{where}.summary")
            enc = item.get("encrypted_content")
            if enc is not None and enc != "enc-responses":
                raise Invalid("The encrypted content could not be decrypted or parsed.", f"{where}.encrypted_content")
        else:
            raise Invalid(f"Invalid value: '{kind}' for '{where}.type'.", f"{where}.type")
    for call_id in calls:
        if call_id not in answered:
            raise Invalid(f"No tool output found for function call {call_id}.", "input")


def _validate_message(item: dict[str, Any], where: str) -> None:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise Invalid(f"Invalid value: '{role}'. Supported values are: 'assistant', 'system', 'developer', and 'user'.",
                      f"{where}.role")
    content = item.get("content")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise Invalid(f"Invalid type for '{where}.content': expected a string or an array.", f"{where}.content")
    for j, p in enumerate(content):
        pw = f"{where}.content[{j}]"
        if role == "assistant":
            if not isinstance(p, dict) or p.get("type") not in ("output_text", "refusal"):
                kind = p.get("type") if isinstance(p, dict) else None
                raise Invalid(f"Invalid value: '{kind}'. Supported values are: 'output_text' and 'refusal'.",
                              f"{pw}.type")
            if p["type"] == "output_text" and not isinstance(p.get("text"), str):
                raise Invalid(f"Missing required parameter: '{pw}.text'.", f"{pw}.text")
        else:
            _validate_input_part(p, pw)


def _validate_input_part(p: Any, where: str) -> None:
    if not isinstance(p, dict):
        raise Invalid(f"Invalid type for '{where}': expected an object.", where)
    kind = p.get("type")
    if kind == "input_text":
        if not isinstance(p.get("text"), str):
            raise Invalid(f"Missing required parameter: '{where}.text'.", f"{where}.text")
    elif kind == "input_image":
        url = p.get("image_url")
        if url is None and not isinstance(p.get("file_id"), str):
            raise Invalid(f"Missing required parameter: '{where}.image_url'.", f"{where}.image_url")
        if isinstance(url, str):
            if url.startswith("data:"):
                if not re.match(r"^data:image/[a-z0-9.+-]+;base64,[A-Za-z0-9+/=]+$", url):
                    raise Invalid(f"Invalid '{where}.image_url'. Expected a base64-encoded data URL with an image "
                                  "MIME type.", f"{where}.image_url")
            elif not url.startswith(("http://", "https://")):
                raise Invalid(f"Invalid '{where}.image_url'. Expected a valid URL.", f"{where}.image_url")
        if p.get("detail", "auto") not in ("auto", "low", "high", "original"):
            raise Invalid(f"Invalid value for '{where}.detail'.", f"{where}.detail")
    elif kind == "input_file":
        if isinstance(p.get("file_data"), str):
            if not isinstance(p.get("filename"), str):
                raise Invalid(f"Missing required parameter: '{where}.filename'.", f"{where}.filename")
        elif not isinstance(p.get("file_id"), str) and not isinstance(p.get("file_url"), str):
            raise Invalid(f"Missing required parameter: '{where}.file_data'.", f"{where}.file_data")
    else:
        raise Invalid(f"Invalid value: '{kind}'. Supported values are: 'input_text', 'input_image', and "
                      "'input_file'.", f"{where}.type")


# ---------------------------------------------------------------- scenarios


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return []


def _items(body: dict[str, Any]) -> list[dict[str, Any]]:
    inp = body["input"]
    if isinstance(inp, str):
        return [{"type": "message", "role": "user", "content": inp}]
    return [dict(it, type=it.get("type", "message")) for it in inp]


def _first_image(items: list[dict[str, Any]]) -> str:
    for it in items:
        parts = it.get("content") if it["type"] == "message" else it.get("output")
        for p in parts if isinstance(parts, list) else []:
            if isinstance(p, dict) and p.get("type") == "input_image":
                url = p.get("image_url")
                if isinstance(url, str) and url.startswith("data:"):
                    return url[5:].split(";", 1)[0]
                if isinstance(url, str):
                    return mimetypes.guess_type(url.split("?", 1)[0])[0] or "unknown"
                return "unknown"
    return "none"


def _scenario(body: dict[str, Any]) -> tuple[str, str]:
    """(scenario, answer text) from the last user turn."""
    items = _items(body)
    if items and items[-1]["type"] in ("function_call_output", "custom_tool_call_output"):
        first = len(items) - 1
        while first > 0 and items[first - 1]["type"] in ("function_call_output", "custom_tool_call_output"):
            first -= 1
        return "tool_result", "Tool said: " + "".join(_texts(items[first].get("output")))
    last_user = next((it for it in reversed(items) if it["type"] == "message" and it.get("role") == "user"), {})
    text = " ".join(_texts(last_user.get("content")))
    for tag in ("error400", "error500", "error429", "cut", "linger", "tool", "parallel", "custom", "think", "length",
                "image", "json", "echo"):
        if f"[{tag}]" in text:
            if tag == "image":
                return tag, f"image: {_first_image(items)}"
            if tag == "echo":
                system = [body["instructions"]] if isinstance(body.get("instructions"), str) else []
                system += [t for it in items if it["type"] == "message" and it.get("role") in ("system", "developer")
                           for t in _texts(it.get("content"))]
                return tag, "system: " + "|".join(system)
            return tag, ""
    return "text", "The answer is 42."


_CALLS = {
    "tool": [("fc_fake001", "call_fake_weather", "get_weather", ['{"city": ', '"Paris"}'])],
    "parallel": [
        ("fc_fake001", "call_fake_weather", "get_weather", ['{"city": ', '"Paris"}']),
        ("fc_fake002", "call_fake_time", "get_time", ['{"tz": ', '"Europe/Paris"}']),
    ],
}
_PATCH = ["*** Begin Patch\n*** Add File: a.txt\n", "+hello\n*** End Patch"]


def _plan(scenario: str, text: str) -> tuple[list[str], list[str], str]:
    """(reasoning fragments, text fragments, status)."""
    if scenario in _CALLS or scenario == "custom":
        return [], [], "completed"
    if scenario == "think":
        return ["Let me", " think."], ["The answer", " is", " 42."], "completed"
    if scenario == "length":
        return [], ["The answer", " is"], "incomplete"
    if scenario == "json":
        return [], ['{"answer"', ": 42}"], "completed"
    if scenario in ("text", "cut", "linger"):
        return [], ["The answer", " is", " 42."], "completed"
    third = max(len(text) // 3, 1)  # one-piece answers still come in 3 deltas
    return [], [text[:third], text[third: 2 * third], text[2 * third:]], "completed"


def _usage(reasoning: int) -> dict[str, Any]:
    return {"input_tokens": _INPUT, "input_tokens_details": {"cached_tokens": _CACHED},
            "output_tokens": _OUTPUT, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": _INPUT + _OUTPUT}


def _response(body: dict[str, Any], status: str, output: list[dict[str, Any]], usage: Any) -> dict[str, Any]:
    return {
        "id": RESP_ID, "object": "response", "created_at": CREATED, "status": status, "background": False,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "model": body["model"], "output": output, "parallel_tool_calls": True, "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None}, "store": False, "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": "auto", "tools": [],
        "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": None, "metadata": {},
    }


def _reasoning_item(text: str) -> dict[str, Any]:
    return {"id": "rs_fake001", "type": "reasoning", "summary": [{"type": "summary_text", "text": text}],
            "encrypted_content": "enc-responses"}


def _message_item(text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    return {"id": "msg_fake001", "type": "message", "status": status, "role": "assistant", "content": content}


def _final_output(scenario: str, text: str) -> tuple[list[dict[str, Any]], str, int]:
    reasoning, texts, status = _plan(scenario, text)
    output: list[dict[str, Any]] = []
    if reasoning:
        output.append(_reasoning_item("".join(reasoning)))
    if texts:
        output.append(_message_item("".join(texts), "completed"))
    for item_id, call_id, name, frags in _CALLS.get(scenario, []):
        output.append({"id": item_id, "type": "function_call", "status": "completed", "call_id": call_id,
                       "name": name, "arguments": "".join(frags)})
    if scenario == "custom":
        output.append({"id": "ctc_fake001", "type": "custom_tool_call", "status": "completed",
                       "call_id": "call_fake_patch", "name": "apply_patch", "input": "".join(_PATCH)})
    return output, status, 3 if reasoning else 0


async def _stream(request: web.Request, body: dict[str, Any], scenario: str, text: str) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    seq = 0

    async def send(event: str, payload: dict[str, Any], trailer: bytes = b"") -> None:
        nonlocal seq
        data = {"type": event, "sequence_number": seq, **payload}
        seq += 1
        await resp.write(f"event: {event}\ndata: {_dumps(data)}\n\n".encode() + trailer)

    reasoning, texts, status = _plan(scenario, text)
    await send("response.created", {"response": _response(body, "in_progress", [], None)})
    await send("response.in_progress", {"response": _response(body, "in_progress", [], None)})
    index = 0
    if reasoning:
        full = "".join(reasoning)
        await send("response.output_item.added", {"output_index": index, "item": {
            "id": "rs_fake001", "type": "reasoning", "summary": []}})
        await send("response.reasoning_summary_part.added", {"item_id": "rs_fake001", "output_index": index,
                   "summary_index": 0, "part": {"type": "summary_text", "text": ""}})
        for frag in reasoning:
            await send("response.reasoning_summary_text.delta", {"item_id": "rs_fake001", "output_index": index,
                       "summary_index": 0, "delta": frag})
        await send("response.reasoning_summary_text.done", {"item_id": "rs_fake001", "output_index": index,
                   "summary_index": 0, "text": full})
        await send("response.reasoning_summary_part.done", {"item_id": "rs_fake001", "output_index": index,
                   "summary_index": 0, "part": {"type": "summary_text", "text": full}})
        await send("response.output_item.done", {"output_index": index, "item": _reasoning_item(full)})
        index += 1
    if texts:
        full = "".join(texts)
        ids = {"item_id": "msg_fake001", "output_index": index, "content_index": 0}
        await send("response.output_item.added", {"output_index": index, "item": _message_item("", "in_progress")})
        await send("response.content_part.added", {**ids, "part": {"type": "output_text", "text": "",
                                                                   "annotations": [], "logprobs": []}})
        for frag in texts:
            await send("response.output_text.delta", {**ids, "delta": frag, "logprobs": []})
            if scenario == "cut":
                await resp.write_eof()  # the body ends here, without any terminal event
                return resp
        await send("response.output_text.done", {**ids, "text": full, "logprobs": []})
        await send("response.content_part.done", {**ids, "part": {"type": "output_text", "text": full,
                                                                  "annotations": [], "logprobs": []}})
        await send("response.output_item.done", {"output_index": index, "item": _message_item(full, "completed")})
        index += 1
    for item_id, call_id, name, frags in _CALLS.get(scenario, []):
        args = "".join(frags)
        await send("response.output_item.added", {"output_index": index, "item": {
            "id": item_id, "type": "function_call", "status": "in_progress", "call_id": call_id, "name": name,
            "arguments": ""}})
        for frag in frags:
            await send("response.function_call_arguments.delta", {"item_id": item_id, "output_index": index,
                                                                  "delta": frag})
        await send("response.function_call_arguments.done", {"item_id": item_id, "output_index": index,
                                                             "name": name, "arguments": args})
        await send("response.output_item.done", {"output_index": index, "item": {
            "id": item_id, "type": "function_call", "status": "completed", "call_id": call_id, "name": name,
            "arguments": args}})
        index += 1
    if scenario == "custom":
        await send("response.output_item.added", {"output_index": index, "item": {
            "id": "ctc_fake001", "type": "custom_tool_call", "status": "in_progress", "call_id": "call_fake_patch",
            "name": "apply_patch", "input": ""}})
        for frag in _PATCH:
            await send("response.custom_tool_call_input.delta", {"item_id": "ctc_fake001", "output_index": index,
                                                                 "delta": frag})
        await send("response.custom_tool_call_input.done", {"item_id": "ctc_fake001", "output_index": index,
                                                            "input": "".join(_PATCH)})
        await send("response.output_item.done", {"output_index": index, "item": {
            "id": "ctc_fake001", "type": "custom_tool_call", "status": "completed", "call_id": "call_fake_patch",
            "name": "apply_patch", "input": "".join(_PATCH)}})
    output, status, reasoning_tokens = _final_output(scenario, text)
    terminal = "response.incomplete" if status == "incomplete" else "response.completed"
    if scenario == "linger":
        # the terminal event and a [DONE] in one write, then the body stays
        # open (for at most 30 s) until the peer hangs up
        await send(terminal, {"response": _response(body, status, output, _usage(reasoning_tokens))},
                   b"data: [DONE]\n\n")
        for _ in range(300):
            if request.transport is None or request.transport.is_closing():
                break
            await asyncio.sleep(0.1)
    else:
        await send(terminal, {"response": _response(body, status, output, _usage(reasoning_tokens))})
    await resp.write_eof()
    return resp


async def _responses(request: web.Request, log: list[dict[str, Any]] | None) -> web.StreamResponse:
    raw = await request.read()
    try:
        body: Any = json.loads(raw) if raw else None
    except ValueError:
        body = None
    if log is not None:
        log.append({"method": request.method, "path": request.path, "query": dict(request.query),
                    "headers": {k.lower(): v for k, v in request.headers.items()}, "body": body})
    denied = _check_key(request)
    if denied is not None:
        return denied
    if not isinstance(body, dict):
        return _error(400, "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                      "using your HTTP library correctly.)", "invalid_request_error")
    try:
        _validate(body)
    except Invalid as exc:
        return _error(400, exc.message, "invalid_request_error", param=exc.param)
    scenario, text = _scenario(body)
    if scenario == "error400":
        return _error(400, "bad request from fake", "invalid_request_error")
    if scenario == "error500":
        return _error(500, "The server had an error while processing your request. Sorry about that!", "server_error")
    if scenario == "error429":
        return _error(429, "Rate limit reached for requests (fake).", "requests", code="rate_limit_exceeded",
                      headers={"retry-after": "1"})
    if body.get("stream") is True:
        return await _stream(request, body, scenario, text)
    output, status, reasoning_tokens = _final_output(scenario, text)
    payload = _response(body, status, output, _usage(reasoning_tokens))
    return web.Response(text=_dumps(payload), content_type="application/json")


def make_app(log: list[dict[str, Any]] | None = None) -> web.Application:
    """The fake upstream: ``POST /v1/responses``; every request is appended to ``log``."""
    app = web.Application()

    async def responses(request: web.Request) -> web.StreamResponse:
        return await _responses(request, log)

    app.router.add_post("/v1/responses", responses)
    return app
