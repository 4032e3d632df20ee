"""Upstream side: ir.Request -> a Responses API request.

The gateway is stateless, so every request carries the whole conversation with
``store: false``; reasoning continuity then relies on ``encrypted_content``,
which is requested whenever reasoning is on.
"""

from __future__ import annotations

from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy.protocol import UpstreamRequest

from .common import PROTOCOL, data_url, tools_by_name

# budget -> effort: the largest effort whose default budget is not above it
_BUDGET_EFFORT = ((64000, "max"), (32768, "xhigh"), (16384, "high"), (4096, "medium"), (1024, "low"))

_EXT = {"application/pdf": "pdf", "text/plain": "txt", "text/markdown": "md", "text/csv": "csv",
        "application/json": "json", "text/html": "html"}


def budget_to_effort(budget: int) -> str:
    for threshold, effort in _BUDGET_EFFORT:
        if budget >= threshold:
            return effort
    return "minimal"


def encode_request(req: ir.Request, upstream_model: str, *, stream: bool) -> UpstreamRequest:
    """Build the POST /responses body for ``req``."""
    if req.n is not None and req.n > 1:
        raise ProxyError("invalid_request", "n > 1 is not supported by openai-responses", param="n")
    if req.stop:
        # the Responses API has no stop sequences; ignoring them would change the answer
        raise ProxyError("invalid_request", "stop sequences are not supported by openai-responses", param="stop")
    body: dict[str, Any] = {"model": upstream_model}
    instructions = "\n\n".join(p.text for p in req.system if p.text)
    if instructions:
        body["instructions"] = instructions
    body["input"] = _Input(req).items()
    tools = [_tool(t) for t in req.tools]
    if tools:
        body["tools"] = tools
    _tool_choice(body, req)
    if req.max_tokens is not None:
        body["max_output_tokens"] = req.max_tokens
    if req.temperature is not None:
        body["temperature"] = req.temperature
    if req.top_p is not None:
        body["top_p"] = req.top_p
    _reasoning(body, req.reasoning)
    fmt = _format(req.response_format)
    if fmt is not None:
        body["text"] = {"format": fmt}
    if req.user:
        body["user"] = req.user
    body["store"] = False
    body["stream"] = stream
    return UpstreamRequest(path="/responses", body=orjson.dumps(body), stream=stream)


class _Input:
    """IR messages -> flat input items, in order."""

    def __init__(self, req: ir.Request) -> None:
        self.req = req
        self.out: list[dict[str, Any]] = []
        self.tools = tools_by_name(req)
        self.call_kinds: dict[str, str] = {}  # call id -> function | custom

    def items(self) -> list[dict[str, Any]]:
        for i, m in enumerate(self.req.messages):
            if m.role == "assistant":
                self._assistant(m)
            elif m.role == "system":
                texts = [{"type": "input_text", "text": p.text} for p in m.content if isinstance(p, ir.TextPart) and p.text]
                if texts:
                    self.out.append({"type": "message", "role": "developer", "content": texts})
            else:
                self._user(m, f"messages[{i}]")
        return self.out

    def _assistant(self, m: ir.Message) -> None:
        texts: list[dict[str, Any]] = []

        def flush() -> None:
            if texts:
                self.out.append({"type": "message", "role": "assistant", "content": list(texts)})
                texts.clear()

        for p in m.content:
            if isinstance(p, ir.TextPart):
                if p.text:
                    texts.append({"type": "output_text", "text": p.text, "annotations": []})
                continue
            flush()
            if isinstance(p, ir.ToolCallPart):
                custom = p.kind == "custom"
                self.call_kinds[p.id] = "custom" if custom else "function"
                if custom:
                    self.out.append({"type": "custom_tool_call", "call_id": p.id, "name": p.name, "input": p.arguments})
                else:
                    self.out.append({"type": "function_call", "call_id": p.id, "name": p.name,
                                     "arguments": p.arguments or "{}"})
            elif isinstance(p, ir.ReasoningPart):
                # only our own encrypted reasoning can be replayed; foreign or
                # unsigned reasoning would be rejected or is useless (pitfall 16)
                if p.signature and p.signature_protocol == PROTOCOL:
                    pd = p.provider_data.get(PROTOCOL) or {}
                    summary = pd.get("summary")
                    if not isinstance(summary, list):
                        summary = [{"type": "summary_text", "text": p.text}] if p.text else []
                    self.out.append({"type": "reasoning", "summary": summary, "encrypted_content": p.signature})
            # images/files in an assistant turn have no Responses form: dropped
        flush()

    def _user(self, m: ir.Message, path: str) -> None:
        parts: list[dict[str, Any]] = []

        def flush() -> None:
            if parts:
                self.out.append({"type": "message", "role": "user", "content": list(parts)})
                parts.clear()

        for j, p in enumerate(m.content):
            if isinstance(p, ir.ToolResultPart):
                flush()
                self.out.append(self._result(p, f"{path}.content[{j}]"))
            else:
                enc = _content(p, f"{path}.content[{j}]")
                if enc is not None:
                    parts.append(enc)
        flush()

    def _result(self, p: ir.ToolResultPart, path: str) -> dict[str, Any]:
        kind = self.call_kinds.get(p.tool_call_id)
        if kind is None:
            tool = self.tools.get(p.name or "")
            kind = "custom" if tool is not None and tool.kind == "custom" else "function"
        output: Any
        if all(isinstance(c, ir.TextPart) for c in p.content):
            output = "\n".join(c.text for c in p.content if isinstance(c, ir.TextPart))
            if p.is_error:
                # no error flag on the wire: say it in the text
                output = "Error: " + output
        else:
            output = [enc for j, c in enumerate(p.content) if (enc := _content(c, f"{path}.content[{j}]")) is not None]
            if p.is_error:
                output.insert(0, {"type": "input_text", "text": "Error:"})
        item_type = "custom_tool_call_output" if kind == "custom" else "function_call_output"
        return {"type": item_type, "call_id": p.tool_call_id, "output": output}


def _content(p: ir.Part, path: str) -> dict[str, Any] | None:
    if isinstance(p, ir.TextPart):
        return {"type": "input_text", "text": p.text}
    if isinstance(p, ir.ImagePart):
        if p.data is not None:
            url = data_url(p.media_type or "image/png", p.data)
        elif p.url:
            url = p.url
        else:
            raise ProxyError("invalid_request", f"{path}: an image needs data or a url", param=path)
        return {"type": "input_image", "image_url": url, "detail": p.detail or "auto"}
    if isinstance(p, ir.FilePart):
        pd = p.provider_data.get(PROTOCOL) or {}
        if p.file_id and pd.get("kind") == "image":
            return {"type": "input_image", "file_id": p.file_id, "detail": pd.get("detail") or "auto"}
        if p.data is not None:
            name = p.filename or "document." + _EXT.get(p.media_type or "", "bin")
            return {"type": "input_file", "filename": name, "file_data": data_url(p.media_type, p.data)}
        if p.url:
            return {"type": "input_file", "file_url": p.url}
        if p.file_id:
            return {"type": "input_file", "file_id": p.file_id}
        raise ProxyError("invalid_request", f"{path}: a file needs data, a url or a file id", param=path)
    return None  # reasoning or tool calls in a user turn: nothing to send


def _tool(t: ir.Tool) -> dict[str, Any]:
    if t.kind == "custom":
        out: dict[str, Any] = {"type": "custom", "name": t.name}
        if t.description:
            out["description"] = t.description
        fmt = (t.provider_data.get(PROTOCOL) or {}).get("format")
        if isinstance(fmt, dict):
            out["format"] = fmt
        return out
    out = {"type": "function", "name": t.name, "parameters": t.parameters or {"type": "object", "properties": {}},
           # Responses defaults to strict: a schema written for another API
           # (no additionalProperties:false) would be rejected, so say it
           "strict": bool(t.strict)}
    if t.description:
        out["description"] = t.description
    return out


def _tool_choice(body: dict[str, Any], req: ir.Request) -> None:
    tc = req.tool_choice
    if tc is None:
        return
    if tc.mode == "tool" and tc.name:
        tool = tools_by_name(req).get(tc.name)
        kind = "custom" if tool is not None and tool.kind == "custom" else "function"
        body["tool_choice"] = {"type": kind, "name": tc.name}
    elif tc.mode in ("auto", "none", "required"):
        body["tool_choice"] = tc.mode
    if tc.parallel is not None and req.tools:
        body["parallel_tool_calls"] = tc.parallel


def _reasoning(body: dict[str, Any], r: ir.Reasoning | None) -> None:
    if r is None:
        return
    if not r.enabled:
        if r.effort == "none":
            body["reasoning"] = {"effort": "none"}
        return  # "disabled" from another protocol: the model's default
    effort = r.effort
    if effort is None and r.budget_tokens is not None:
        effort = budget_to_effort(r.budget_tokens)
    out: dict[str, Any] = {}
    if effort:
        out["effort"] = effort
    if r.include_thoughts:
        out["summary"] = "auto"
    if out:
        body["reasoning"] = out
    body["include"] = ["reasoning.encrypted_content"]


def _format(rf: ir.ResponseFormat | None) -> dict[str, Any] | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return {"type": "json_object"}
    out: dict[str, Any] = {"type": "json_schema", "name": rf.name or "response", "schema": rf.schema or {}}
    if rf.strict is not None:
        out["strict"] = rf.strict
    return out
