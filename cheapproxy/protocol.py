"""Base classes for wire-format codecs ("protocols") registered through the
``register_protocols`` hook.

A protocol has two sides:

* the **client side** serves inbound requests in its wire format: its routes,
  ``inspect`` (model name + stream flag, cheap), ``decode_request`` (wire -> IR),
  ``encode_response`` / ``stream_encoder`` (IR -> wire) and the native error
  shapes;
* the **upstream side** talks to a provider that speaks the format:
  ``encode_request`` (IR -> wire), ``decode_response`` / ``stream_decoder``
  (wire -> IR), and ``passthrough`` for same-protocol relays, where the body is
  forwarded as-is except for the model name and usage is read on the way.

Translating OpenAI Chat -> Anthropic is then
``anthropic.encode_request(openai_chat.decode_request(...))``: N codecs, not N^2.
Codecs are stateless singletons; per-stream state lives in the encoder/decoder
objects they create.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from . import ir
from .errors import ProxyError


@attrs.frozen(kw_only=True)
class Route:
    """One client-facing route.  ``operation`` is ``chat``, ``count_tokens`` or
    ``embeddings``.  ``path`` is an aiohttp pattern; Gemini's ``{model}`` and
    ``{method}`` are read back through ``match_info``."""

    method: str
    path: str
    operation: str


@attrs.frozen(kw_only=True)
class Inbound:
    """What the pipeline needs before deciding anything: the requested model name
    and whether the client wants a stream.  ``body`` is the parsed JSON object."""

    model: str
    stream: bool
    operation: str
    body: dict[str, Any]
    match_info: dict[str, str] = attrs.field(factory=dict)
    query: dict[str, str] = attrs.field(factory=dict)
    headers: dict[str, str] = attrs.field(factory=dict)  # lower-cased, only those the protocol may forward


@attrs.frozen(kw_only=True)
class EncodeContext:
    """Passed to client-side encoders: the model name the client asked for, the
    request id, a creation timestamp, and the decoded request (for flags such as
    OpenAI's include_usage or the names of Responses custom tools)."""

    model: str
    request_id: str
    created: int
    request: ir.Request | None = None
    inbound: Inbound | None = None


@attrs.frozen(kw_only=True)
class UpstreamRequest:
    """An HTTP request to send upstream.  ``path`` is relative to the upstream's
    ``base_url`` (for example ``/chat/completions`` under an OpenAI base ending in
    ``/v1``; ``/v1/messages`` under Anthropic's root).  Credentials are added by
    the provider, never here."""

    path: str
    body: bytes
    query: dict[str, str] = attrs.field(factory=dict)
    headers: dict[str, str] = attrs.field(factory=dict)
    stream: bool = False


class StreamEncoder:
    """Turns IR stream events into client wire bytes for one response."""

    content_type: str = "text/event-stream; charset=utf-8"

    def start(self) -> bytes:
        """Bytes to send before the first event (e.g. Gemini's ``[``)."""
        return b""

    def encode(self, event: ir.StreamEvent) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def encode_text_run(self, run: ir.TextRun) -> bytes:
        """The bytes of ``run``: by default, ``encode`` of each of its
        TextDeltas.  An encoder may build them at once from ``run.literals``
        (the same bytes, fewer calls); ``encode`` itself never gets a run."""
        return b"".join([self.encode(ir.TextDelta(run.index, t)) for t in run.texts])

    def error(self, err: ProxyError) -> bytes:
        """The protocol's in-stream error event, sent when the stream fails
        after it started; the stream then ends."""
        raise NotImplementedError  # pragma: no cover - interface

    def close(self) -> bytes:
        """Bytes after the last event (``data: [DONE]``, Gemini's ``]``)."""
        return b""


class StreamDecoder:
    """Turns upstream wire bytes into IR events for one response.

    ``feed`` takes any chunking of the body; ``close`` is called at end of body
    and must emit what is pending.  If the body ended without the protocol's
    end marker, ``close`` emits a StreamError (``kind="upstream_failed"``,
    message says the stream was cut), never a clean MessageStop.

    ``text_runs`` is set True by a consumer that takes ``ir.TextRun`` events
    (the streaming relay, whose encoder has ``encode_text_run``): a decoder
    may then give the text frames that came in one read as one TextRun
    instead of a TextDelta each.  Left False, it never gives a TextRun.
    """

    text_runs: bool = False

    def feed(self, chunk: bytes) -> list[ir.StreamEvent]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> list[ir.StreamEvent]:  # pragma: no cover - interface
        raise NotImplementedError


class Passthrough:
    """Same-protocol relay of one response: bytes in, bytes out, usage read on
    the way.  ``feed`` returns the bytes to forward (normally the input
    unchanged; OpenAI Chat strips the usage chunk the client did not ask for).

    ``usage`` is the latest cumulative usage seen, or None.  ``complete`` is
    True once the protocol's end marker went by.  ``output_seen`` is True once
    any content reached the client (used for fallback and billing decisions).
    """

    usage: ir.Usage | None = None
    complete: bool = False
    output_seen: bool = False
    error_message: str | None = None  # an in-stream error event went by
    #: the protocol's terminal event went by (OpenAI's ``[DONE]``, Anthropic's
    #: ``message_stop``): nothing after it is for the client, so the relay
    #: ends the response with the bytes ``feed`` returned for this read (cut
    #: after the terminal frame) and reads no further.  Left False by taps
    #: whose "complete" is not the last byte (Gemini's finishReason)
    ended: bool = False

    def feed(self, chunk: bytes) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> bytes:
        return b""


class Protocol:
    """A wire-format codec.  Subclasses set ``name`` and implement the methods;
    a codec that cannot serve one side (say, embeddings upstream) raises
    ProxyError("invalid_request", ...) naming what is unsupported."""

    name: ClassVar[str]
    #: HTTP headers of the client request that may be forwarded upstream on a
    #: same-protocol relay (lower case), e.g. anthropic-version, anthropic-beta
    forward_headers: ClassVar[frozenset[str]] = frozenset()

    # ------------------------------------------------------------ client side

    def routes(self) -> list[Route]:
        raise NotImplementedError

    def inspect(self, route: Route, body: dict[str, Any], match_info: dict[str, str], query: dict[str, str]) -> tuple[str, bool]:
        """Return (model name, wants stream) without decoding the whole body.
        Raise ProxyError("invalid_request", ..., param="model") when missing."""
        raise NotImplementedError

    def decode_request(self, inbound: Inbound) -> ir.Request:
        """Client wire body -> IR.  Raise ProxyError("invalid_request", msg,
        param=field) for malformed input, naming the field."""
        raise NotImplementedError

    def encode_response(self, response: ir.Response, ctx: EncodeContext) -> bytes:
        raise NotImplementedError

    def stream_encoder(self, ctx: EncodeContext) -> StreamEncoder:
        raise NotImplementedError

    def encode_error(self, err: ProxyError) -> tuple[int, bytes]:
        """The native error body and status for ``err``."""
        raise NotImplementedError

    # count tokens (client side): only protocols with a count route
    def encode_count_tokens(self, input_tokens: int, ctx: EncodeContext) -> bytes:
        raise ProxyError("not_found", f"{self.name} has no token counting endpoint")

    # embeddings (client side): only protocols with an embeddings route
    def decode_embeddings_request(self, inbound: Inbound) -> ir.EmbeddingRequest:
        raise ProxyError("not_found", f"{self.name} has no embeddings endpoint")

    def encode_embeddings_response(self, response: ir.EmbeddingResponse, ctx: EncodeContext) -> bytes:
        raise ProxyError("not_found", f"{self.name} has no embeddings endpoint")

    # ------------------------------------------------------------ upstream side

    def encode_request(self, request: ir.Request, upstream_model: str, *, stream: bool) -> UpstreamRequest:
        """IR -> upstream wire request.  For what the target cannot express,
        raise ProxyError("invalid_request", ..., param=field) rather than
        silently dropping something that changes the answer."""
        raise NotImplementedError

    def decode_response(self, body: bytes) -> ir.Response:
        raise NotImplementedError

    def stream_decoder(self) -> StreamDecoder:
        raise NotImplementedError

    def decode_error(self, status: int, body: bytes) -> str:
        """Extract a human message from an upstream error body (no secrets)."""
        return body[:300].decode("utf-8", "replace")

    def passthrough_request(self, inbound: Inbound, upstream_model: str) -> UpstreamRequest:
        """Same-protocol relay: the client body with only the model replaced
        (plus what billing needs, e.g. OpenAI include_usage)."""
        raise NotImplementedError

    def passthrough(self, inbound: Inbound, *, stream: bool) -> Passthrough:
        raise NotImplementedError

    def usage_from_body(self, body: bytes) -> ir.Usage | None:
        """Usage of a non-streamed same-protocol response body."""
        raise NotImplementedError

    def encode_count_tokens_request(self, request: ir.Request, upstream_model: str) -> UpstreamRequest | None:
        """Upstream token counting request, or None when the upstream has none."""
        return None

    def decode_count_tokens_response(self, body: bytes) -> int:
        raise NotImplementedError

    def encode_embeddings_request(self, request: ir.EmbeddingRequest, upstream_model: str) -> UpstreamRequest:
        raise ProxyError("invalid_request", f"upstream protocol {self.name} does not serve embeddings")

    def decode_embeddings_response(self, body: bytes) -> ir.EmbeddingResponse:
        raise NotImplementedError
