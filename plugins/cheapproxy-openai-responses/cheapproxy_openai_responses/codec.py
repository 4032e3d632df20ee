"""The ``openai-responses`` protocol: the OpenAI Responses API (what Codex
speaks), client side and upstream side."""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy.protocol import EncodeContext, Inbound, Passthrough, Protocol, Route, StreamDecoder, StreamEncoder, UpstreamRequest

from . import request_decode, request_encode, response
from .common import PROTOCOL
from .passthrough import ResponsesPassthrough, usage_from_body
from .stream import ResponsesStreamEncoder
from .stream_decode import ResponsesStreamDecoder


class ResponsesProtocol(Protocol):
    """``POST /v1/responses``, streamed (SSE with ``event:`` lines) and not."""

    name: ClassVar[str] = PROTOCOL
    # nothing a Responses client sends needs to reach the upstream on a relay:
    # the model, the body and our own credential say it all
    forward_headers: ClassVar[frozenset[str]] = frozenset()

    # ------------------------------------------------------------ client side

    def routes(self) -> list[Route]:
        return [Route(method="POST", path="/v1/responses", operation="chat")]

    def inspect(self, route: Route, body: dict[str, Any], match_info: dict[str, str], query: dict[str, str]) -> tuple[str, bool]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ProxyError("invalid_request", "you must provide a model parameter", param="model")
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise ProxyError("invalid_request", "stream must be a boolean", param="stream")
        return model, stream

    def decode_request(self, inbound: Inbound) -> ir.Request:
        return request_decode.decode_request(inbound.body)

    def encode_response(self, response_: ir.Response, ctx: EncodeContext) -> bytes:
        return response.encode_response(response_, ctx)

    def stream_encoder(self, ctx: EncodeContext) -> StreamEncoder:
        return ResponsesStreamEncoder(ctx)

    def encode_error(self, err: ProxyError) -> tuple[int, bytes]:
        return response.encode_error(err)

    # ------------------------------------------------------------ upstream side

    def encode_request(self, request: ir.Request, upstream_model: str, *, stream: bool) -> UpstreamRequest:
        return request_encode.encode_request(request, upstream_model, stream=stream)

    def decode_response(self, body: bytes) -> ir.Response:
        return response.decode_response(body)

    def stream_decoder(self) -> StreamDecoder:
        return ResponsesStreamDecoder()

    def decode_error(self, status: int, body: bytes) -> str:
        return response.decode_error(status, body)

    def passthrough_request(self, inbound: Inbound, upstream_model: str) -> UpstreamRequest:
        body = dict(inbound.body)
        body["model"] = upstream_model
        return UpstreamRequest(path="/responses", body=orjson.dumps(body), stream=inbound.stream)

    def passthrough(self, inbound: Inbound, *, stream: bool) -> Passthrough:
        return ResponsesPassthrough(stream=stream)

    def usage_from_body(self, body: bytes) -> ir.Usage | None:
        return usage_from_body(body)
