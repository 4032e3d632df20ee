"""The protocol-neutral internal representation (IR).

Every codec decodes its wire format into these classes and encodes from them, so
N protocols need N codecs rather than N-squared translators.  The classes are
plain mutable attrs classes: codecs build them incrementally.

Conventions
-----------
* ``provider_data`` is a dict namespaced by protocol name (``"anthropic-messages"``,
  ``"gemini"``, ``"openai-responses"`` ...).  A codec stores opaque values it must
  send back unchanged on a later round trip through the *same* protocol (thinking
  signatures, Gemini thought signatures, encrypted reasoning, item ids) under its
  own name and never reads another protocol's entry.
* Token counts are ints.  ``Usage.input_tokens`` is the *uncached* input (the
  Anthropic meaning); OpenAI/Gemini codecs convert (see protocols.md 5.8).
* Tool-call arguments are kept as the JSON *text* (``arguments``): OpenAI streams
  them in fragments and a codec must not have to parse partial JSON.
"""

from __future__ import annotations

import enum
from typing import Any, Literal, Union

import attrs


class StopReason(str, enum.Enum):
    """Why the model stopped (IR-owned; each codec maps to and from it)."""

    END_TURN = "end_turn"  # natural end
    STOP_SEQUENCE = "stop_sequence"  # a stop sequence matched
    MAX_TOKENS = "max_tokens"  # output limit reached
    TOOL_USE = "tool_use"  # the model called tools
    CONTENT_FILTER = "content_filter"  # refusal / safety block
    PAUSE = "pause"  # Anthropic pause_turn
    CONTEXT_LIMIT = "context_limit"  # context window exceeded
    ERROR = "error"  # upstream reported failure


@attrs.define(kw_only=True)
class Usage:
    """Token usage.  input_tokens excludes cache reads and writes."""

    input_tokens: int = 0
    output_tokens: int = 0  # includes reasoning tokens
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0  # subset of output_tokens

    @property
    def total_input_tokens(self) -> int:
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens

    def is_zero(self) -> bool:
        return not (
            self.input_tokens or self.output_tokens or self.cache_read_tokens or self.cache_write_tokens
        )


# ---------------------------------------------------------------- content parts


@attrs.define(kw_only=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"
    provider_data: dict[str, Any] = attrs.Factory(dict)  # e.g. cache_control, thoughtSignature


@attrs.define(kw_only=True)
class ImagePart:
    """An image: either inline base64 ``data`` with ``media_type`` or a ``url``."""

    media_type: str | None = None
    data: str | None = None  # base64, no data: prefix
    url: str | None = None
    detail: str | None = None  # OpenAI detail hint
    type: Literal["image"] = "image"
    provider_data: dict[str, Any] = attrs.Factory(dict)


@attrs.define(kw_only=True)
class FilePart:
    """A document (PDF etc.): inline base64 data or url or provider file id."""

    media_type: str | None = None
    data: str | None = None
    url: str | None = None
    file_id: str | None = None
    filename: str | None = None
    type: Literal["file"] = "file"
    provider_data: dict[str, Any] = attrs.Factory(dict)


@attrs.define(kw_only=True)
class ReasoningPart:
    """Visible reasoning / thinking.

    ``signature`` is the continuity token of the protocol named in
    ``signature_protocol`` (Anthropic thinking signature, Gemini thoughtSignature,
    OpenAI encrypted_content); only that protocol may send it back.
    ``redacted`` holds Anthropic redacted_thinking data (text is then empty).
    """

    text: str = ""
    signature: str | None = None
    signature_protocol: str | None = None
    redacted: str | None = None
    type: Literal["reasoning"] = "reasoning"
    provider_data: dict[str, Any] = attrs.Factory(dict)


@attrs.define(kw_only=True)
class ToolCallPart:
    id: str
    name: str
    arguments: str = "{}"  # JSON text of the arguments object
    kind: Literal["function", "custom"] = "function"  # custom = Responses freeform tool (raw input text)
    type: Literal["tool_call"] = "tool_call"
    provider_data: dict[str, Any] = attrs.Factory(dict)


@attrs.define(kw_only=True)
class ToolResultPart:
    tool_call_id: str
    name: str | None = None  # Gemini needs the function name; codecs fill it from history
    content: list[Part] = attrs.Factory(list)  # text / image parts
    is_error: bool = False
    type: Literal["tool_result"] = "tool_result"
    provider_data: dict[str, Any] = attrs.Factory(dict)


Part = Union[TextPart, ImagePart, FilePart, ReasoningPart, ToolCallPart, ToolResultPart]

Role = Literal["system", "user", "assistant"]


@attrs.define(kw_only=True)
class Message:
    """One turn.  role "system" inside ``messages`` is a mid-conversation system
    message (Claude Code's beta, OpenAI developer messages after the start);
    tool results live in ``user`` messages as ToolResultParts."""

    role: Role
    content: list[Part] = attrs.Factory(list)
    provider_data: dict[str, Any] = attrs.Factory(dict)


@attrs.define(kw_only=True)
class Tool:
    name: str
    description: str | None = None
    parameters: dict[str, Any] = attrs.Factory(lambda: {"type": "object", "properties": {}})
    kind: Literal["function", "custom"] = "function"
    strict: bool | None = None
    provider_data: dict[str, Any] = attrs.Factory(dict)


@attrs.define(kw_only=True)
class ToolChoice:
    mode: Literal["auto", "none", "required", "tool"] = "auto"
    name: str | None = None  # with mode "tool"
    parallel: bool | None = None  # False = disable parallel tool calls


@attrs.define(kw_only=True)
class Reasoning:
    """Thinking / reasoning request.  ``effort`` in none|minimal|low|medium|high|xhigh|max;
    ``budget_tokens`` when the client gave a budget; ``adaptive`` for Anthropic adaptive."""

    enabled: bool = True
    effort: str | None = None
    budget_tokens: int | None = None
    adaptive: bool = False
    include_thoughts: bool = True  # whether visible reasoning text is wanted


@attrs.define(kw_only=True)
class ResponseFormat:
    type: Literal["text", "json_object", "json_schema"] = "text"
    schema: dict[str, Any] | None = None
    name: str | None = None
    strict: bool | None = None


@attrs.define(kw_only=True)
class Request:
    """A chat/generation request in IR form."""

    model: str
    messages: list[Message] = attrs.Factory(list)
    system: list[TextPart] = attrs.Factory(list)  # leading system prompt
    tools: list[Tool] = attrs.Factory(list)
    tool_choice: ToolChoice | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = attrs.Factory(list)
    stream: bool = False
    reasoning: Reasoning | None = None
    response_format: ResponseFormat | None = None
    n: int | None = None
    seed: int | None = None
    user: str | None = None
    # per-protocol extras a same-protocol upstream may want back (e.g. metadata)
    provider_data: dict[str, Any] = attrs.Factory(dict)


@attrs.define(kw_only=True)
class Response:
    """A complete (non-streamed) answer."""

    id: str
    model: str
    content: list[Part] = attrs.Factory(list)
    stop_reason: StopReason = StopReason.END_TURN
    stop_sequence: str | None = None
    usage: Usage = attrs.Factory(Usage)
    provider_data: dict[str, Any] = attrs.Factory(dict)


# ---------------------------------------------------------------- stream events
#
# A stream is: MessageStart, then for each content block PartStart -> deltas ->
# PartStop (blocks never interleave: a decoder whose upstream interleaves must
# buffer), then MessageStop.  UsageUpdate may come at any point (values are
# cumulative: the latest wins, field by field when not None).  StreamError ends
# the stream abnormally.


@attrs.define(kw_only=True)
class MessageStart:
    id: str
    model: str
    usage: Usage | None = None
    type: Literal["message_start"] = "message_start"


@attrs.define(kw_only=True)
class PartStart:
    """Opens block ``index`` (0-based, contiguous).  ``part`` is an empty template:
    TextPart(text=""), ReasoningPart(), ToolCallPart(id, name, arguments="")."""

    index: int
    part: Part
    type: Literal["part_start"] = "part_start"


# The three deltas are most of a stream's events: their index and value may
# also be given by position (``TextDelta(0, "hi")``), which a decoder's hot
# path uses because a call with keywords costs about twice as much.


@attrs.define
class TextDelta:
    index: int
    text: str
    type: Literal["text_delta"] = attrs.field(default="text_delta", kw_only=True)


@attrs.define
class TextRun:
    """Consecutive TextDeltas of block ``index`` as one event: what a decoder
    gives, when asked (``StreamDecoder.text_runs``), for text frames that
    arrived together in one read.  It stands for ``TextDelta(index, t)`` for
    each ``t`` in ``texts`` (none empty); ``literals`` are the same texts as
    ``orjson.dumps`` writes them, so that an encoder can build all their frames
    by joining bytes (``StreamEncoder.encode_text_run``) instead of one call
    per delta."""

    index: int
    texts: list[str]
    literals: list[bytes]
    type: Literal["text_run"] = attrs.field(default="text_run", kw_only=True)


@attrs.define
class ReasoningDelta:
    index: int
    text: str = ""
    # a signature fragment/whole, for signature_protocol
    signature: str | None = attrs.field(default=None, kw_only=True)
    signature_protocol: str | None = attrs.field(default=None, kw_only=True)
    type: Literal["reasoning_delta"] = attrs.field(default="reasoning_delta", kw_only=True)


@attrs.define
class ToolCallDelta:
    index: int
    arguments: str  # JSON text fragment
    type: Literal["tool_call_delta"] = attrs.field(default="tool_call_delta", kw_only=True)


@attrs.define(kw_only=True)
class PartStop:
    index: int
    provider_data: dict[str, Any] = attrs.Factory(dict)  # e.g. a Gemini thoughtSignature
    type: Literal["part_stop"] = "part_stop"


@attrs.define(kw_only=True)
class UsageUpdate:
    usage: Usage
    type: Literal["usage"] = "usage"


@attrs.define(kw_only=True)
class MessageStop:
    stop_reason: StopReason
    stop_sequence: str | None = None
    usage: Usage | None = None  # final cumulative usage when known
    type: Literal["message_stop"] = "message_stop"


@attrs.define(kw_only=True)
class StreamError:
    """The upstream failed mid-stream.  ``status`` is the HTTP-like status to
    report (e.g. 500, 529, 504); ``kind`` is an errors.ProxyError kind."""

    message: str
    kind: str = "upstream_failed"
    status: int = 502
    type: Literal["error"] = "error"


StreamEvent = Union[
    MessageStart, PartStart, TextDelta, TextRun, ReasoningDelta, ToolCallDelta, PartStop, UsageUpdate, MessageStop,
    StreamError,
]


# ---------------------------------------------------------------- embeddings


@attrs.define(kw_only=True)
class EmbeddingRequest:
    model: str
    inputs: list[Any]  # strings or token arrays
    dimensions: int | None = None
    encoding_format: str | None = None  # "float" | "base64" as the client asked
    user: str | None = None


@attrs.define(kw_only=True)
class EmbeddingResponse:
    model: str
    vectors: list[list[float]]
    usage: Usage = attrs.Factory(Usage)


_ZERO_USAGE = Usage()


def merge_usage(base: Usage | None, new: Usage) -> Usage:
    """Cumulative merge: fields of ``new`` that are non-zero replace ``base``'s."""
    if base is None:
        base = _ZERO_USAGE  # a copy (attrs.evolve costs several times a plain call)
    return Usage(
        input_tokens=new.input_tokens or base.input_tokens,
        output_tokens=new.output_tokens or base.output_tokens,
        cache_read_tokens=new.cache_read_tokens or base.cache_read_tokens,
        cache_write_tokens=new.cache_write_tokens or base.cache_write_tokens,
        reasoning_tokens=new.reasoning_tokens or base.reasoning_tokens,
    )


def collect(events: list[StreamEvent]) -> Response:
    """Fold a complete event list into a Response (used to turn a streamed
    upstream answer into a non-streamed client answer and in tests)."""
    acc = ResponseAccumulator()
    for ev in events:
        acc.feed(ev)
    return acc.response()


class ResponseAccumulator:
    """Incrementally folds stream events into a Response."""

    def __init__(self) -> None:
        self.id = ""
        self.model = ""
        self.parts: dict[int, Part] = {}
        self.stop_reason: StopReason | None = None
        self.stop_sequence: str | None = None
        self.usage: Usage | None = None
        self.error: StreamError | None = None

    def feed(self, ev: StreamEvent) -> None:
        if isinstance(ev, MessageStart):
            self.id, self.model = ev.id, ev.model
            if ev.usage is not None:
                self.usage = merge_usage(self.usage, ev.usage)
        elif isinstance(ev, PartStart):
            self.parts[ev.index] = attrs.evolve(ev.part)
        elif isinstance(ev, TextDelta):
            p = self.parts[ev.index]
            assert isinstance(p, TextPart)
            p.text += ev.text
        elif isinstance(ev, TextRun):
            p = self.parts[ev.index]
            assert isinstance(p, TextPart)
            p.text += "".join(ev.texts)
        elif isinstance(ev, ReasoningDelta):
            p = self.parts[ev.index]
            assert isinstance(p, ReasoningPart)
            p.text += ev.text
            if ev.signature:
                p.signature = (p.signature or "") + ev.signature
                p.signature_protocol = ev.signature_protocol
        elif isinstance(ev, ToolCallDelta):
            p = self.parts[ev.index]
            assert isinstance(p, ToolCallPart)
            p.arguments += ev.arguments
        elif isinstance(ev, PartStop):
            p = self.parts.get(ev.index)
            if p is not None and ev.provider_data:
                for k, v in ev.provider_data.items():
                    p.provider_data.setdefault(k, {}).update(v)
        elif isinstance(ev, UsageUpdate):
            self.usage = merge_usage(self.usage, ev.usage)
        elif isinstance(ev, MessageStop):
            self.stop_reason = ev.stop_reason
            self.stop_sequence = ev.stop_sequence
            if ev.usage is not None:
                self.usage = merge_usage(self.usage, ev.usage)
        elif isinstance(ev, StreamError):
            self.error = ev

    def response(self) -> Response:
        content = [self.parts[i] for i in sorted(self.parts)]
        for p in content:
            if isinstance(p, ToolCallPart) and not p.arguments:
                p.arguments = "{}"
        stop = self.stop_reason or StopReason.END_TURN
        return Response(
            id=self.id,
            model=self.model,
            content=content,
            stop_reason=stop,
            stop_sequence=self.stop_sequence,
            usage=self.usage or Usage(),
        )
