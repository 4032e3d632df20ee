"""Loopback fake of the OpenAI Chat Completions and embeddings API (tests).

Speaks the wire format of protocols.md section 1 with bodies written out here
by hand (never built by cheapproxy's codecs, so a codec bug cannot hide
itself).  The answer is picked from tags in the last user turn, as described
in docs/dev/fakes.md.  Serve it under a base URL ending in ``/v1``.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import re
import struct
from typing import Any

from aiohttp import web

SECRET = "upstream-secret"
CREATED = 1700000000
CHAT_ID = "chatcmpl-fake0001"
_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}

# usage per fakes.md: uncached 10 + cached 5 = prompt 15; output 7
_PROMPT, _CACHED, _OUTPUT = 15, 5, 7


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _usage(reasoning: int) -> dict[str, Any]:
    return {
        "prompt_tokens": _PROMPT,
        "completion_tokens": _OUTPUT,
        "total_tokens": _PROMPT + _OUTPUT,
        "prompt_tokens_details": {"cached_tokens": _CACHED, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _error(status: int, message: str, etype: str, *, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": etype, "param": param, "code": code}}
    return web.Response(status=status, text=_dumps(body), content_type="application/json", headers=headers)


def _invalid(message: str, param: str | None = None, code: str | None = None) -> web.Response:
    return _error(400, message, "invalid_request_error", param=param, code=code)


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


def _validate_part(p: Any, where: str) -> str | None:
    if not isinstance(p, dict):
        return f"Invalid type for '{where}': expected an object."
    t = p.get("type")
    if t == "text":
        return None if isinstance(p.get("text"), str) else f"Missing required parameter: '{where}.text'."
    if t == "image_url":
        img = p.get("image_url")
        url = img.get("url") if isinstance(img, dict) else None
        if not isinstance(url, str):
            return f"Missing required parameter: '{where}.image_url.url'."
        if url.startswith("data:"):
            head, sep, _ = url.partition(",")
            if not sep or not head.endswith(";base64"):
                return f"Invalid '{where}.image_url.url': expected a base64-encoded data URL."
        elif not url.startswith(("http://", "https://")):
            return f"Invalid '{where}.image_url.url': expected a URL or a data URL."
        return None
    if t == "input_audio":
        a = p.get("input_audio")
        ok = isinstance(a, dict) and isinstance(a.get("data"), str) and a.get("format") in ("wav", "mp3")
        return None if ok else f"Invalid '{where}.input_audio'."
    if t == "file":
        f = p.get("file")
        ok = isinstance(f, dict) and (isinstance(f.get("file_data"), str) or isinstance(f.get("file_id"), str))
        return None if ok else f"Invalid '{where}.file'."
    return f"Invalid value: '{t}'. Supported values are: 'text', 'image_url', 'input_audio' and 'file'."


def _validate(body: Any) -> web.Response | None:
    if not isinstance(body, dict):
        return _invalid("We could not parse the JSON body of your request.")
    if not isinstance(body.get("model"), str) or not body["model"]:
        return _invalid("you must provide a model parameter", "model")
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        return _invalid("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not msgs:
        return _invalid("Invalid 'messages': empty array. Expected an array with minimum length 1.", "messages")
    if "stream_options" in body and body.get("stream") is not True:
        return _invalid("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            return _invalid("Invalid type for 'tools': expected an array.", "tools")
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
                return _invalid(f"Invalid 'tools[{i}]': expected a function tool.", f"tools[{i}]")
            if not isinstance(fn.get("name"), str) or not _NAME_RE.match(fn["name"]):
                return _invalid(f"Invalid 'tools[{i}].function.name': string does not match pattern.",
                                f"tools[{i}].function.name")
    if "parallel_tool_calls" in body and not tools:
        return _invalid("Invalid value for 'parallel_tool_calls': only allowed when 'tools' are specified.",
                        "parallel_tool_calls")
    if "tool_choice" in body and not tools and body["tool_choice"] != "none":
        return _invalid("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                        "tool_choice")
    pending: list[str] = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            return _invalid(f"Invalid value for '{where}.role'.", f"{where}.role")
        role, content = m["role"], m.get("content")
        if role != "tool" and pending:
            return _invalid("An assistant message with 'tool_calls' must be followed by tool messages responding to "
                            f"each 'tool_call_id'. The following tool_call_ids did not have response messages: "
                            f"{', '.join(pending)}", "messages", "invalid_request_error")
        if role in ("system", "developer", "user"):
            if isinstance(content, list):
                for j, p in enumerate(content):
                    if role != "user" and not (isinstance(p, dict) and p.get("type") == "text"):
                        msg = f"Invalid '{where}.content[{j}]': only text parts are allowed."
                        return _invalid(msg, f"{where}.content")
                    err = _validate_part(p, f"{where}.content[{j}]")
                    if err:
                        return _invalid(err, f"{where}.content[{j}]")
            elif not isinstance(content, str):
                msg = f"Invalid type for '{where}.content': expected a string or an array."
                return _invalid(msg, f"{where}.content")
        elif role == "assistant":
            calls = m.get("tool_calls")
            if content is None and not calls:
                msg = f"Invalid value for '{where}.content': expected a string, got null."
                return _invalid(msg, f"{where}.content")
            if content is not None and not isinstance(content, (str, list)):
                return _invalid(f"Invalid type for '{where}.content'.", f"{where}.content")
            for j, tc in enumerate(calls or []):
                cw = f"{where}.tool_calls[{j}]"
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(tc, dict) or not isinstance(tc.get("id"), str) or not isinstance(fn, dict):
                    return _invalid(f"Invalid '{cw}'.", cw)
                if not isinstance(fn.get("name"), str):
                    return _invalid(f"Missing required parameter: '{cw}.function.name'.", f"{cw}.function.name")
                if not isinstance(fn.get("arguments"), str):
                    return _invalid(f"Invalid type for '{cw}.function.arguments': expected a string, but got "
                                    f"{type(fn.get('arguments')).__name__} instead.", f"{cw}.function.arguments",
                                    "invalid_type")
                pending.append(tc["id"])
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if call_id not in pending:
                return _invalid("Invalid parameter: messages with role 'tool' must be a response to a preceeding "
                                "message with 'tool_calls'.", f"{where}.role")
            pending.remove(call_id)
            if not isinstance(content, (str, list)):
                return _invalid(f"Invalid type for '{where}.content'.", f"{where}.content")
    if pending:
        return _invalid("An assistant message with 'tool_calls' must be followed by tool messages responding to each "
                        f"'tool_call_id'. The following tool_call_ids did not have response messages: "
                        f"{', '.join(pending)}", "messages")
    return None


# ---------------------------------------------------------------- scenarios


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content
                if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)]
    return []


def _first_image(msgs: list[dict[str, Any]]) -> str:
    for m in msgs:
        content = m.get("content")
        for p in content if isinstance(content, list) else []:
            if isinstance(p, dict) and p.get("type") == "image_url":
                url = p["image_url"]["url"]
                if url.startswith("data:"):
                    return url[5:].split(";", 1)[0]
                return mimetypes.guess_type(url.split("?", 1)[0])[0] or "unknown"
    return "none"


_TAGS = ("error400", "error500", "error429", "cut", "burst", "padded", "tool", "parallel", "think", "length", "image", "json", "echo")


def _scenario(body: dict[str, Any]) -> tuple[str, str]:
    """(scenario, answer text) from the last user turn."""
    msgs = body["messages"]
    if msgs[-1]["role"] in ("tool", "function"):
        first = len(msgs) - 1
        while first > 0 and msgs[first - 1]["role"] in ("tool", "function"):
            first -= 1
        return "tool_result", "Tool said: " + "".join(_texts(msgs[first].get("content")))
    last_user = next((m for m in reversed(msgs) if m["role"] == "user"), {})
    text = " ".join(_texts(last_user.get("content")))
    for tag in _TAGS:
        if f"[{tag}]" in text:
            if tag == "image":
                return tag, f"image: {_first_image(msgs)}"
            if tag == "echo":
                system = [t for m in msgs if m["role"] in ("system", "developer") for t in _texts(m.get("content"))]
                return tag, "system: " + "|".join(system)
            return tag, ""
    return "text", "The answer is 42."


# [burst]: a 40-delta answer whose whole stream goes out in one write (an
# upstream faster than the gateway reads it, or one that buffers)
BURST_WORDS = ["Burst"] + [f" w{i}" for i in range(1, 38)] + [' "quoted"', " é."]
# [padded]: the same, every chunk padded as OpenAI does by default (a last
# "obfuscation" member of random letters and digits, unless the request
# says stream_options.include_obfuscation: false)
_PAD = "Zx8kQ3mN7pL2vR9t"

_CALLS = {
    "tool": [("call_fake_weather", "get_weather", ['{"city": ', '"Paris"}'])],
    "parallel": [
        ("call_fake_weather", "get_weather", ['{"city": ', '"Paris"}']),
        ("call_fake_time", "get_time", ['{"tz": ', '"Europe/Paris"}']),
    ],
}


def _plan(scenario: str, text: str) -> tuple[list[tuple[str, str]], str]:
    """Stream steps [(kind, fragment)] and the finish reason."""
    if scenario in _CALLS:
        return [], "tool_calls"
    if scenario == "think":
        return [("reasoning", "Let me think."), ("text", "The answer"), ("text", " is"), ("text", " 42.")], "stop"
    if scenario == "length":
        return [("text", "The answer"), ("text", " is")], "length"
    if scenario == "json":
        return [("text", '{"answer"'), ("text", ": 42}")], "stop"
    if scenario in ("burst", "padded"):
        return [("text", w) for w in BURST_WORDS], "stop"
    if scenario == "text" or scenario == "cut":
        return [("text", "The answer"), ("text", " is"), ("text", " 42.")], "stop"
    # one-piece answers (image, echo, tool results) still come in 3 deltas
    third = max(len(text) // 3, 1)
    return [("text", text[:third]), ("text", text[third : 2 * third]), ("text", text[2 * third :])], "stop"


def _complete(body: dict[str, Any], scenario: str, text: str) -> web.Response:
    steps, finish = _plan(scenario, text)
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None, "annotations": []}
    reasoning = "".join(f for k, f in steps if k == "reasoning")
    answer = "".join(f for k, f in steps if k == "text")
    if answer:
        message["content"] = answer
    if reasoning:
        message["reasoning_content"] = reasoning
    if scenario in _CALLS:
        message["tool_calls"] = [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": "".join(frags)}}
            for cid, name, frags in _CALLS[scenario]
        ]
    payload = {
        "id": CHAT_ID,
        "object": "chat.completion",
        "created": CREATED,
        "model": body["model"],
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": _usage(3 if reasoning else 0),
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }
    return web.Response(text=_dumps(payload), content_type="application/json")


async def _stream(request: web.Request, body: dict[str, Any], scenario: str, text: str) -> web.StreamResponse:
    so = body.get("stream_options")
    include_usage = isinstance(so, dict) and so.get("include_usage") is True
    model = body["model"]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    held: list[bytes] | None = [] if scenario in ("burst", "padded") else None  # all in one write, at the end
    padded = scenario == "padded" and not (isinstance(so, dict) and so.get("include_obfuscation") is False)
    pads = iter(range(1 << 30))

    def pad(chunk: dict[str, Any]) -> dict[str, Any]:
        if padded:
            n = next(pads)
            chunk["obfuscation"] = _PAD[n % 7 : n % 7 + 1 + n % 9]
        return chunk

    async def put(data: bytes) -> None:
        if held is None:
            await resp.write(data)
        else:
            held.append(data)

    def frame(delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": CHAT_ID, "object": "chat.completion.chunk", "created": CREATED, "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            chunk["usage"] = None
        return b"data: " + _dumps(pad(chunk)).encode() + b"\n\n"

    steps, finish = _plan(scenario, text)
    first = {"role": "assistant", "content": None if scenario in _CALLS else "", "refusal": None}
    await put(frame(first))
    if scenario == "cut":
        await put(frame({"content": steps[0][1]}))
        await resp.write_eof()  # the body ends here, without finish chunk or [DONE]
        return resp
    for kind, frag in steps:
        await put(frame({"reasoning_content" if kind == "reasoning" else "content": frag}))
    for index, (cid, name, frags) in enumerate(_CALLS.get(scenario, [])):
        head = {"index": index, "id": cid, "type": "function", "function": {"name": name, "arguments": ""}}
        await put(frame({"tool_calls": [head]}))
        for frag in frags:
            await put(frame({"tool_calls": [{"index": index, "function": {"arguments": frag}}]}))
    await put(frame({}, finish))
    if include_usage:
        reasoning = 3 if any(k == "reasoning" for k, _ in steps) else 0
        last = {"id": CHAT_ID, "object": "chat.completion.chunk", "created": CREATED, "model": model,
                "system_fingerprint": "fp_fake", "choices": [], "usage": _usage(reasoning)}
        await put(b"data: " + _dumps(pad(last)).encode() + b"\n\n")
    await put(b"data: [DONE]\n\n")
    if held is not None:
        await resp.write(b"".join(held))
    await resp.write_eof()
    return resp


# ---------------------------------------------------------------- app


async def _read(request: web.Request, log: list[dict[str, Any]]) -> tuple[Any, bool]:
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else None
        ok = True
    except ValueError:
        body, ok = None, False
    log.append({
        "method": request.method,
        "path": request.path,
        "query": dict(request.query),
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body": body,
    })
    return body, ok


def make_app(log: list[dict[str, Any]] | None = None) -> web.Application:
    """The fake upstream; every request is appended to ``log`` before the answer."""
    log = log if log is not None else []

    async def chat(request: web.Request) -> web.StreamResponse:
        body, ok = await _read(request, log)
        denied = _check_key(request)
        if denied is not None:
            return denied
        if not ok:
            return _invalid("We could not parse the JSON body of your request.")
        invalid = _validate(body)
        if invalid is not None:
            return invalid
        scenario, text = _scenario(body)
        if scenario == "error400":
            return _invalid("bad request from fake")
        if scenario == "error500":
            return _error(500, "internal error from fake", "server_error")
        if scenario == "error429":
            return _error(429, "rate limited by fake", "requests", code="rate_limit_exceeded",
                          headers={"retry-after": "1"})
        if body.get("stream") is True:
            return await _stream(request, body, scenario, text)
        return _complete(body, scenario, text)

    async def embeddings(request: web.Request) -> web.Response:
        body, ok = await _read(request, log)
        denied = _check_key(request)
        if denied is not None:
            return denied
        if not ok or not isinstance(body, dict):
            return _invalid("We could not parse the JSON body of your request.")
        if not isinstance(body.get("model"), str) or not body["model"]:
            return _invalid("you must provide a model parameter", "model")
        raw = body.get("input")
        if isinstance(raw, str) or (isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw)):
            inputs: list[Any] = [raw]
        elif isinstance(raw, list) and raw:
            inputs = raw
        else:
            return _invalid("'input' : input must be a string, an array of strings or an array of tokens", "input")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            return _invalid(f"Invalid value for 'encoding_format': '{fmt}'.", "encoding_format")
        data = []
        for i in range(len(inputs)):
            vec = [0.25 * (i + 1), -0.5, 0.125, 1.0]  # exact in float32
            emb: Any = base64.b64encode(struct.pack("<4f", *vec)).decode() if fmt == "base64" else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = 3 * len(inputs)
        payload = {"object": "list", "data": data, "model": body["model"],
                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return web.Response(text=_dumps(payload), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    return app
