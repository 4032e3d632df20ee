"""The conformance matrix: every inbound protocol x every upstream protocol x
streamed or not x scenario, driven by the official SDKs against loopback fake
upstreams that speak each exact wire format (docs/dev/fakes.md).

Each case asserts what the client sees: text, tool names and parsed
arguments, the stop reason, visible reasoning and every usage number.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import anthropic
import attrs
import openai
import pytest
from google import genai
from google.genai import types as gt

INBOUND = ["openai-chat", "openai-responses", "anthropic-messages", "gemini"]
UPSTREAM = ["openai-chat", "openai-responses", "anthropic-messages", "gemini"]
SCENARIOS = ["text", "system", "tool_round_trip", "parallel_tools", "image", "thinking"]

# a 1x1 PNG
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
PNG_B64 = base64.b64encode(PNG).decode()

WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"name": "get_time", "description": "Time in a zone",
        "schema": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}


@attrs.define
class Result:
    text: str = ""
    reasoning: str = ""
    tool_calls: list[tuple[str, dict[str, Any], str]] = attrs.Factory(list)  # (name, args, id)
    stop: str = ""  # normalized: end | tool | length
    total_input: int | None = None
    cache_read: int | None = None
    output: int | None = None


# ------------------------------------------------------------------ OpenAI Chat


def _oa_tools(names):
    return [{"type": "function", "function": {"name": t["name"], "description": t["description"], "parameters": t["schema"]}}
            for t in names]


async def openai_chat(gw, scenario: str, stream: bool, history: list | None = None) -> tuple[Result, list]:
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    kw: dict[str, Any] = {}
    msgs: list[dict[str, Any]]
    if scenario == "system":
        msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "[echo] hi"}]
    elif scenario == "image":
        msgs = [{"role": "user", "content": [{"type": "text", "text": "[image] what is it"},
                                              {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}}]}]
    elif scenario == "thinking":
        msgs = [{"role": "user", "content": "[think] hard"}]
        kw["reasoning_effort"] = "high"
    elif scenario == "parallel_tools":
        msgs = [{"role": "user", "content": "[parallel] both"}]
        kw["tools"] = _oa_tools([WEATHER, TIME])
    elif scenario == "tool_round_trip":
        msgs = history or [{"role": "user", "content": "[tool] weather in Paris?"}]
        kw["tools"] = _oa_tools([WEATHER])
    else:
        msgs = [{"role": "user", "content": "hello"}]
    r = Result()
    if not stream:
        resp = await client.chat.completions.create(model="m", messages=msgs, **kw)
        m = resp.choices[0].message
        r.text = m.content or ""
        r.reasoning = (m.model_extra or {}).get("reasoning_content") or ""
        r.tool_calls = [(tc.function.name, json.loads(tc.function.arguments), tc.id) for tc in m.tool_calls or []]
        finish = resp.choices[0].finish_reason
        u = resp.usage
    else:
        s = await client.chat.completions.create(model="m", messages=msgs, stream=True,
                                                 stream_options={"include_usage": True}, **kw)
        calls: dict[int, list] = {}
        finish, u = None, None
        async for chunk in s:
            if chunk.usage is not None:
                u = chunk.usage
            for ch in chunk.choices:
                d = ch.delta
                r.text += d.content or ""
                r.reasoning += (d.model_extra or {}).get("reasoning_content") or ""
                for tc in d.tool_calls or []:
                    c = calls.setdefault(tc.index, ["", "", ""])
                    if tc.id:
                        c[2] = tc.id
                    if tc.function and tc.function.name:
                        c[0] = tc.function.name
                    if tc.function and tc.function.arguments:
                        c[1] += tc.function.arguments
                if ch.finish_reason:
                    finish = ch.finish_reason
        r.tool_calls = [(n, json.loads(a or "{}"), i) for n, a, i in (calls[k] for k in sorted(calls))]
    r.stop = {"stop": "end", "tool_calls": "tool", "length": "length"}.get(finish, finish)
    if u is not None:
        r.total_input, r.output = u.prompt_tokens, u.completion_tokens
        r.cache_read = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0
    if scenario == "tool_round_trip" and history is None:
        hist = msgs + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a)}} for n, a, i in r.tool_calls]}]
        hist += [{"role": "tool", "tool_call_id": i, "content": "18C"} for _, _, i in r.tool_calls]
        return r, hist
    return r, []


# ------------------------------------------------------------------ OpenAI Responses


def _resp_tools(names):
    return [{"type": "function", "name": t["name"], "description": t["description"], "parameters": t["schema"]} for t in names]


async def openai_responses(gw, scenario: str, stream: bool, history: list | None = None) -> tuple[Result, list]:
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    kw: dict[str, Any] = {}
    inp: Any
    if scenario == "system":
        inp = [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "[echo] hi"}]
    elif scenario == "image":
        inp = [{"role": "user", "content": [{"type": "input_text", "text": "[image] what is it"},
                                             {"type": "input_image", "image_url": f"data:image/png;base64,{PNG_B64}"}]}]
    elif scenario == "thinking":
        inp = "[think] hard"
        kw["reasoning"] = {"effort": "high", "summary": "auto"}
    elif scenario == "parallel_tools":
        inp = "[parallel] both"
        kw["tools"] = _resp_tools([WEATHER, TIME])
    elif scenario == "tool_round_trip":
        inp = history or [{"role": "user", "content": "[tool] weather in Paris?"}]
        kw["tools"] = _resp_tools([WEATHER])
    else:
        inp = "hello"
    if not stream:
        resp = await client.responses.create(model="m", input=inp, **kw)
    else:
        async with client.responses.stream(model="m", input=inp, **kw) as s:
            async for _ in s:
                pass
            resp = await s.get_final_response()
    r = Result()
    for item in resp.output:
        if item.type == "message":
            r.text += "".join(c.text for c in item.content if c.type == "output_text")
        elif item.type == "reasoning":
            r.reasoning += "".join(x.text for x in item.summary or []) + "".join(x.text for x in (item.content or []))
        elif item.type == "function_call":
            r.tool_calls.append((item.name, json.loads(item.arguments or "{}"), item.call_id))
    if resp.status == "incomplete":
        r.stop = "length"
    else:
        r.stop = "tool" if r.tool_calls else "end"
    u = resp.usage
    r.total_input, r.output = u.input_tokens, u.output_tokens
    r.cache_read = u.input_tokens_details.cached_tokens
    if scenario == "tool_round_trip" and history is None:
        hist = list(inp) + [{"type": "function_call", "call_id": i, "name": n, "arguments": json.dumps(a)} for n, a, i in r.tool_calls]
        hist += [{"type": "function_call_output", "call_id": i, "output": "18C"} for _, _, i in r.tool_calls]
        return r, hist
    return r, []


# ------------------------------------------------------------------ Anthropic


def _an_tools(names):
    return [{"name": t["name"], "description": t["description"], "input_schema": t["schema"]} for t in names]


async def anthropic_messages(gw, scenario: str, stream: bool, history: list | None = None) -> tuple[Result, list]:
    client = anthropic.AsyncAnthropic(base_url=gw.url, api_key=gw.key, max_retries=0)
    kw: dict[str, Any] = {"max_tokens": 1000}
    if scenario == "system":
        msgs = [{"role": "user", "content": "[echo] hi"}]
        kw["system"] = [{"type": "text", "text": "Be terse."}]
    elif scenario == "image":
        msgs = [{"role": "user", "content": [{"type": "text", "text": "[image] what is it"},
                                              {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}}]}]
    elif scenario == "thinking":
        msgs = [{"role": "user", "content": "[think] hard"}]
        kw["thinking"] = {"type": "enabled", "budget_tokens": 2048}
        kw["max_tokens"] = 4096
    elif scenario == "parallel_tools":
        msgs = [{"role": "user", "content": "[parallel] both"}]
        kw["tools"] = _an_tools([WEATHER, TIME])
    elif scenario == "tool_round_trip":
        msgs = history or [{"role": "user", "content": "[tool] weather in Paris?"}]
        kw["tools"] = _an_tools([WEATHER])
    else:
        msgs = [{"role": "user", "content": "hello"}]
    if not stream:
        msg = await client.messages.create(model="m", messages=msgs, **kw)
    else:
        async with client.messages.stream(model="m", messages=msgs, **kw) as s:
            msg = await s.get_final_message()
    r = Result()
    for b in msg.content:
        if b.type == "text":
            r.text += b.text
        elif b.type == "thinking":
            r.reasoning += b.thinking
        elif b.type == "tool_use":
            r.tool_calls.append((b.name, b.input, b.id))
    r.stop = {"end_turn": "end", "tool_use": "tool", "max_tokens": "length"}.get(msg.stop_reason, msg.stop_reason)
    u = msg.usage
    r.total_input = u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
    r.cache_read, r.output = u.cache_read_input_tokens or 0, u.output_tokens
    if scenario == "tool_round_trip" and history is None:
        hist = msgs + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
                       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": i, "content": "18C"} for _, _, i in r.tool_calls]}]
        return r, hist
    return r, []


# ------------------------------------------------------------------ Gemini


def _gm_tools(names):
    return [gt.Tool(function_declarations=[gt.FunctionDeclaration(name=t["name"], description=t["description"],
                                                                  parameters_json_schema=t["schema"]) for t in names])]


async def gemini(gw, scenario: str, stream: bool, history: list | None = None) -> tuple[Result, list]:
    client = genai.Client(api_key=gw.key, http_options=gt.HttpOptions(base_url=gw.url, api_version="v1beta"))
    cfg: dict[str, Any] = {}
    contents: Any
    if scenario == "system":
        contents = "[echo] hi"
        cfg["system_instruction"] = "Be terse."
    elif scenario == "image":
        contents = [gt.Content(role="user", parts=[gt.Part(text="[image] what is it"), gt.Part.from_bytes(data=PNG, mime_type="image/png")])]
    elif scenario == "thinking":
        contents = "[think] hard"
        cfg["thinking_config"] = gt.ThinkingConfig(include_thoughts=True, thinking_budget=2048)
    elif scenario == "parallel_tools":
        contents = "[parallel] both"
        cfg["tools"] = _gm_tools([WEATHER, TIME])
    elif scenario == "tool_round_trip":
        contents = history or [gt.Content(role="user", parts=[gt.Part(text="[tool] weather in Paris?")])]
        cfg["tools"] = _gm_tools([WEATHER])
    else:
        contents = "hello"
    config = gt.GenerateContentConfig(**cfg) if cfg else None
    r = Result()
    finish = None
    usage = None
    parts_seen: list[Any] = []
    if not stream:
        resp = await client.aio.models.generate_content(model="m", contents=contents, config=config)
        chunks = [resp]
    else:
        chunks = [c async for c in await client.aio.models.generate_content_stream(model="m", contents=contents, config=config)]
    for c in chunks:
        if c.usage_metadata is not None and c.usage_metadata.prompt_token_count is not None:
            usage = c.usage_metadata
        for cand in c.candidates or []:
            if cand.finish_reason:
                finish = cand.finish_reason
            for p in (cand.content.parts if cand.content and cand.content.parts else []):
                parts_seen.append(p)
                if p.function_call:
                    r.tool_calls.append((p.function_call.name, dict(p.function_call.args or {}), p.function_call.id or ""))
                elif p.text and p.thought:
                    r.reasoning += p.text
                elif p.text:
                    r.text += p.text
    fr = finish.value if hasattr(finish, "value") else finish
    r.stop = {"STOP": "tool" if r.tool_calls else "end", "MAX_TOKENS": "length"}.get(fr, fr)
    if usage is not None:
        r.total_input = usage.prompt_token_count
        r.cache_read = usage.cached_content_token_count or 0
        r.output = (usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)
    if scenario == "tool_round_trip" and history is None:
        hist = list(contents) + [gt.Content(role="model", parts=[p for p in parts_seen if p.function_call])]
        hist.append(gt.Content(role="user", parts=[gt.Part.from_function_response(name=n, response={"output": "18C"}) for n, _, _ in r.tool_calls]))
        return r, hist
    return r, []


CLIENTS = {"openai-chat": openai_chat, "openai-responses": openai_responses, "anthropic-messages": anthropic_messages, "gemini": gemini}


def _check_usage(r: Result, inbound: str, upstream: str, stream: bool, reasoning: bool) -> None:
    write = 2 if upstream == "anthropic-messages" else 0
    assert r.total_input == 15 + write, ("total input", r)
    assert r.cache_read == 5, ("cache read", r)
    assert r.output == 7, ("output", r)


@pytest.fixture
async def matrix_gateway(gateway, fake_upstream):
    cache: dict[str, Any] = {}

    async def get(upstream: str):
        if upstream not in cache:
            fake = await fake_upstream(upstream)
            gw = await gateway(fake.toml("up") + '[[models]]\nname = "m"\nupstream = "up"\nupstream_model = "real-m"\nmax_output_tokens = 8000\n'
                               "[models.price]\ninput = 3\noutput = 15\ncache_write = 3.75\ncache_read = 0.3\n")
            cache[upstream] = (gw, fake)
        return cache[upstream]

    return get


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("upstream", UPSTREAM)
@pytest.mark.parametrize("inbound", INBOUND)
async def test_matrix(matrix_gateway, inbound, upstream, stream, scenario):
    gw, fake = await matrix_gateway(upstream)
    run = CLIENTS[inbound]
    r, hist = await run(gw, scenario, stream)
    assert fake.log, "nothing reached the upstream"
    assert fake.log[-1]["body"] is not None
    if scenario == "text":
        assert r.text == "The answer is 42." and r.stop == "end" and not r.tool_calls
    elif scenario == "system":
        assert r.text == "system: Be terse." and r.stop == "end"
    elif scenario == "image":
        assert r.text == "image: image/png"
    elif scenario == "thinking":
        assert r.text == "The answer is 42."
        assert r.reasoning == "Let me think.", r
    elif scenario == "parallel_tools":
        assert [(n, a) for n, a, _ in r.tool_calls] == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris"})]
        assert r.stop == "tool"
        if inbound != "gemini" or upstream != "gemini":  # a Gemini-to-Gemini relay keeps Gemini's id-less calls
            assert len({i for _, _, i in r.tool_calls}) == 2
    elif scenario == "tool_round_trip":
        assert [(n, a) for n, a, _ in r.tool_calls] == [("get_weather", {"city": "Paris"})] and r.stop == "tool"
        r2, _ = await run(gw, scenario, stream, history=hist)
        assert r2.text.startswith("Tool said: ") and "18C" in r2.text, r2
        assert r2.stop == "end" and not r2.tool_calls
        _check_usage(r2, inbound, upstream, stream, False)
    _check_usage(r, inbound, upstream, stream, scenario == "thinking")
    await gw.idle()
    assert await gw.storage.open_holds() == 0
