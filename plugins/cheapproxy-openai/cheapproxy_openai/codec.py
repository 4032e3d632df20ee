"""The ``openai-chat`` protocol: OpenAI Chat Completions and embeddings, both
as served to clients and as spoken to upstreams."""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy.protocol import (
    EncodeContext,
    Inbound,
    Passthrough,
    Protocol,
    Route,
    StreamDecoder,
    StreamEncoder,
    UpstreamRequest,
)

from . import decode, embeddings, encode, passthrough
from .common import NAME, bad, error_object, error_status, message_from_error_body, scrub
from .stream import ChatStreamDecoder, ChatStreamEncoder


class OpenAIChatProtocol(Protocol):
    """Codec for ``POST /v1/chat/completions`` and ``POST /v1/embeddings``."""

    name: ClassVar[str] = NAME
    # nothing of the client's is forwarded: organization/project headers belong
    # to the client's own OpenAI account, not to the upstream's key
    forward_headers: ClassVar[frozenset[str]] = frozenset()

    # ------------------------------------------------------------ client side

    def routes(self) -> list[Route]:
        return [
            Route(method="POST", path="/v1/chat/completions", operation="chat"),
            Route(method="POST", path="/v1/embeddings", operation="embeddings"),
        ]

    def inspect(
        self, route: Route, body: dict[str, Any], match_info: dict[str, str], query: dict[str, str]
    ) -> tuple[str, bool]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad("you must provide a model parameter", "model")
        if route.operation != "chat":
            return model, False
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise bad("'stream' must be a boolean", "stream")
        return model, bool(stream)

    def decode_request(self, inbound: Inbound) -> ir.Request:
        return decode.decode_request(inbound.body)

    def encode_response(self, response: ir.Response, ctx: EncodeContext) -> bytes:
        return encode.encode_response(response, ctx)

    def stream_encoder(self, ctx: EncodeContext) -> StreamEncoder:
        return ChatStreamEncoder(ctx)

    def encode_error(self, err: ProxyError) -> tuple[int, bytes]:
        return error_status(err), orjson.dumps(error_object(err))

    def decode_embeddings_request(self, inbound: Inbound) -> ir.EmbeddingRequest:
        return decode.decode_embeddings_request(inbound.body)

    def encode_embeddings_response(self, response: ir.EmbeddingResponse, ctx: EncodeContext) -> bytes:
        return embeddings.encode_embeddings_response(response, ctx)

    # ------------------------------------------------------------ upstream side

    def encode_request(self, request: ir.Request, upstream_model: str, *, stream: bool) -> UpstreamRequest:
        body = encode.encode_request(request, upstream_model, stream)
        return UpstreamRequest(
            path="/chat/completions",
            body=orjson.dumps(body),
            headers={"content-type": "application/json"},
            stream=stream,
        )

    def decode_response(self, body: bytes) -> ir.Response:
        return encode.decode_response(body)

    def stream_decoder(self) -> StreamDecoder:
        return ChatStreamDecoder()

    def decode_error(self, status: int, body: bytes) -> str:
        msg = message_from_error_body(body)
        if msg:
            return msg
        text = scrub(body[:300].decode("utf-8", "replace").strip())
        return text or f"the upstream answered HTTP {status}"

    def passthrough_request(self, inbound: Inbound, upstream_model: str) -> UpstreamRequest:
        return passthrough.passthrough_request(inbound, upstream_model)

    def passthrough(self, inbound: Inbound, *, stream: bool) -> Passthrough:
        return passthrough.make_passthrough(inbound, stream)

    def usage_from_body(self, body: bytes) -> ir.Usage | None:
        return passthrough.usage_from_body(body)

    def encode_embeddings_request(self, request: ir.EmbeddingRequest, upstream_model: str) -> UpstreamRequest:
        return embeddings.encode_embeddings_request(request, upstream_model)

    def decode_embeddings_response(self, body: bytes) -> ir.EmbeddingResponse:
        return embeddings.decode_embeddings_response(body)
