"""The ``anthropic-messages`` protocol: both sides of the Anthropic Messages API."""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy.protocol import (
    EncodeContext, Inbound, Passthrough, Protocol, Route, StreamDecoder, StreamEncoder, UpstreamRequest,
)

from . import passthrough, request_decode, request_encode, response
from . import stream as sse_stream
from .common import API_VERSION, COUNT_PATH, MESSAGES_PATH, NAME, error_body, error_status_type, invalid

_JSON_HEADERS = {"content-type": "application/json"}


class AnthropicMessagesProtocol(Protocol):
    """Codec for ``POST /v1/messages`` and ``/v1/messages/count_tokens``."""

    name: ClassVar[str] = NAME
    forward_headers: ClassVar[frozenset[str]] = frozenset({"anthropic-version", "anthropic-beta"})

    # ------------------------------------------------------------ client side

    def routes(self) -> list[Route]:
        return [
            Route(method="POST", path=MESSAGES_PATH, operation="chat"),
            Route(method="POST", path=COUNT_PATH, operation="count_tokens"),
        ]

    def inspect(self, route: Route, body: dict[str, Any], match_info: dict[str, str],
                query: dict[str, str]) -> tuple[str, bool]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise invalid("model is required", "model")
        if route.operation != "chat":
            return model, False
        stream_flag = body.get("stream", False)
        if not isinstance(stream_flag, bool):
            raise invalid("stream must be a boolean", "stream")
        return model, stream_flag

    def decode_request(self, inbound: Inbound) -> ir.Request:
        return request_decode.decode_request(inbound.body, operation=inbound.operation)

    def encode_response(self, response_: ir.Response, ctx: EncodeContext) -> bytes:
        return response.encode_response(response_, ctx.model)

    def stream_encoder(self, ctx: EncodeContext) -> StreamEncoder:
        return sse_stream.MessagesStreamEncoder(ctx)

    def encode_error(self, err: ProxyError) -> tuple[int, bytes]:
        status, etype = error_status_type(err)
        return status, error_body(etype, err.message)

    def encode_count_tokens(self, input_tokens: int, ctx: EncodeContext) -> bytes:
        return orjson.dumps({"input_tokens": input_tokens})

    # ------------------------------------------------------------ upstream side

    def encode_request(self, request: ir.Request, upstream_model: str, *, stream: bool) -> UpstreamRequest:
        body = request_encode.encode_body(request, upstream_model, stream=stream)
        return UpstreamRequest(path=MESSAGES_PATH, body=orjson.dumps(body),
                               headers={"anthropic-version": API_VERSION, **_JSON_HEADERS}, stream=stream)

    def decode_response(self, body: bytes) -> ir.Response:
        return response.decode_response(body)

    def stream_decoder(self) -> StreamDecoder:
        return sse_stream.MessagesStreamDecoder()

    def decode_error(self, status: int, body: bytes) -> str:
        return response.decode_error(status, body)

    def passthrough_request(self, inbound: Inbound, upstream_model: str) -> UpstreamRequest:
        body = dict(inbound.body)
        body["model"] = upstream_model
        headers = {"anthropic-version": inbound.headers.get("anthropic-version") or API_VERSION, **_JSON_HEADERS}
        beta = inbound.headers.get("anthropic-beta")
        if beta:  # e.g. Claude Code's mid-conversation-system: the API 400s without it
            headers["anthropic-beta"] = beta
        # only ?beta=true is meaningful upstream (never a ?key= credential)
        query = {"beta": inbound.query["beta"]} if "beta" in inbound.query else {}
        chat = inbound.operation == "chat"
        return UpstreamRequest(path=MESSAGES_PATH if chat else COUNT_PATH, body=orjson.dumps(body),
                               query=query, headers=headers, stream=chat and inbound.stream)

    def passthrough(self, inbound: Inbound, *, stream: bool) -> Passthrough:
        return passthrough.MessagesPassthrough(stream=stream)

    def usage_from_body(self, body: bytes) -> ir.Usage | None:
        return passthrough.usage_from_body(body)

    def encode_count_tokens_request(self, request: ir.Request, upstream_model: str) -> UpstreamRequest | None:
        body = request_encode.encode_count_body(request, upstream_model)
        return UpstreamRequest(path=COUNT_PATH, body=orjson.dumps(body),
                               headers={"anthropic-version": API_VERSION, **_JSON_HEADERS})

    def decode_count_tokens_response(self, body: bytes) -> int:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        n = data.get("input_tokens") if isinstance(data, dict) else None
        if not isinstance(n, int) or isinstance(n, bool):
            raise ProxyError("upstream_failed", f"{NAME} upstream count_tokens answer has no input_tokens")
        return n
