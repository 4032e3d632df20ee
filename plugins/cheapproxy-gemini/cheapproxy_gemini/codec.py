"""The ``gemini`` protocol: Google's Gemini Developer API wire format, both as
what clients speak to the gateway and as what a Gemini upstream speaks."""

from __future__ import annotations

from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.errors import ProxyError
from cheapproxy.protocol import EncodeContext, Inbound, Passthrough, Protocol, Route, StreamDecoder, StreamEncoder, UpstreamRequest

from . import encode
from .client_request import decode_count_request, decode_generate_request
from .decode import GeminiStreamDecoder, decode_body, error_message
from .passthrough import GeminiPassthrough, usage_from_body
from .upstream_request import encode_generate_body
from .wire import PROTOCOL, get

_METHODS = (("generateContent", "chat"), ("streamGenerateContent", "chat"), ("countTokens", "count_tokens"))
# v1 is the google-genai SDK's default API version; v1beta is what the docs use
_VERSIONS = ("v1beta", "v1")
# upstream calls always use v1beta: it accepts every v1 body and more fields
_UPSTREAM_VERSION = "v1beta"


def _model_id(name: str) -> str:
    return name.removeprefix("models/")


def _path(model: str, method: str) -> str:
    return f"/{_UPSTREAM_VERSION}/models/{_model_id(model)}:{method}"


def _key_rejected(err: Any) -> bool:
    details = err.get("details") if isinstance(err, dict) else None
    return isinstance(details, list) and any(isinstance(d, dict) and d.get("reason") == "API_KEY_INVALID" for d in details)


def _wants_sse(query: dict[str, str] | None) -> bool:
    return bool(query) and query.get("alt") == "sse"  # type: ignore[union-attr]


class GeminiProtocol(Protocol):
    """Codec for ``/v1beta/models/{model}:generateContent`` and friends."""

    name = PROTOCOL
    forward_headers = frozenset()

    # ------------------------------------------------------------ client side

    def routes(self) -> list[Route]:
        return [
            Route(method="POST", path=f"/{version}/models/{{model}}:{method}", operation=op)
            for version in _VERSIONS
            for method, op in _METHODS
        ]

    def inspect(self, route: Route, body: dict[str, Any], match_info: dict[str, str],
                query: dict[str, str]) -> tuple[str, bool]:
        model = _model_id(match_info.get("model", "") or "")
        if not model:
            raise ProxyError("invalid_request", "the model name is missing from the path", param="model")
        return model, route.path.endswith(":streamGenerateContent")

    def decode_request(self, inbound: Inbound) -> ir.Request:
        if not isinstance(inbound.body, dict):
            raise ProxyError("invalid_request", "the request body must be a JSON object")
        if inbound.operation == "count_tokens":
            return decode_count_request(inbound.body, inbound.model)
        return decode_generate_request(inbound.body, inbound.model, stream=inbound.stream)

    def encode_response(self, response: ir.Response, ctx: EncodeContext) -> bytes:
        return encode.encode_response(response, ctx)

    def stream_encoder(self, ctx: EncodeContext) -> StreamEncoder:
        query = ctx.inbound.query if ctx.inbound is not None else {"alt": "sse"}
        return encode.GeminiStreamEncoder(ctx, sse=_wants_sse(query))

    def encode_error(self, err: ProxyError) -> tuple[int, bytes]:
        return encode.encode_error(err)

    def encode_count_tokens(self, input_tokens: int, ctx: EncodeContext) -> bytes:
        return encode.encode_count_tokens(input_tokens)

    # ------------------------------------------------------------ upstream side

    def encode_request(self, request: ir.Request, upstream_model: str, *, stream: bool) -> UpstreamRequest:
        body = encode_generate_body(request, upstream_model)
        if stream:
            return UpstreamRequest(path=_path(upstream_model, "streamGenerateContent"), body=orjson.dumps(body),
                                   query={"alt": "sse"}, stream=True)
        return UpstreamRequest(path=_path(upstream_model, "generateContent"), body=orjson.dumps(body))

    def decode_response(self, body: bytes) -> ir.Response:
        events = decode_body(body)
        for ev in events:
            if isinstance(ev, ir.StreamError):
                raise ProxyError(ev.kind, ev.message, status=ev.status)
        return ir.collect(events)

    def stream_decoder(self) -> StreamDecoder:
        return GeminiStreamDecoder()

    def decode_error(self, status: int, body: bytes) -> str:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return super().decode_error(status, body)
        if isinstance(obj, list) and obj:  # streamGenerateContent without alt wraps errors
            obj = obj[0]
        if isinstance(obj, dict) and "error" in obj:
            err = obj["error"]
            if _key_rejected(err):
                # Gemini answers a bad key with 400 INVALID_ARGUMENT: say whose key it is
                return "the API key configured for this Gemini upstream was rejected (API_KEY_INVALID)"
            return error_message(err)[0]
        return super().decode_error(status, body)

    def passthrough_request(self, inbound: Inbound, upstream_model: str) -> UpstreamRequest:
        body = inbound.body
        if inbound.operation == "count_tokens":
            inner = get(body, "generateContentRequest")
            if isinstance(inner, dict) and "model" in inner:
                # the only place a Gemini body names the model
                key = "generateContentRequest" if "generateContentRequest" in body else "generate_content_request"
                body = {**body, key: {**inner, "model": f"models/{_model_id(upstream_model)}"}}
            return UpstreamRequest(path=_path(upstream_model, "countTokens"), body=orjson.dumps(body))
        if inbound.stream:
            query = {"alt": "sse"} if _wants_sse(inbound.query) else {}
            return UpstreamRequest(path=_path(upstream_model, "streamGenerateContent"), body=orjson.dumps(body),
                                   query=query, stream=True)
        return UpstreamRequest(path=_path(upstream_model, "generateContent"), body=orjson.dumps(body))

    def passthrough(self, inbound: Inbound, *, stream: bool) -> Passthrough:
        return GeminiPassthrough(stream=stream, sse=_wants_sse(inbound.query))

    def usage_from_body(self, body: bytes) -> ir.Usage | None:
        return usage_from_body(body)

    def encode_count_tokens_request(self, request: ir.Request, upstream_model: str) -> UpstreamRequest | None:
        inner = encode_generate_body(request, upstream_model)
        inner = {"model": f"models/{_model_id(upstream_model)}", **inner}
        return UpstreamRequest(path=_path(upstream_model, "countTokens"),
                               body=orjson.dumps({"generateContentRequest": inner}))

    def decode_count_tokens_response(self, body: bytes) -> int:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ProxyError("upstream_failed", "the gemini upstream sent a token count that is not JSON") from None
        # proto JSON omits zero values: {} is a count of 0
        total = get(obj, "totalTokens", 0) if isinstance(obj, dict) and "error" not in obj else None
        if isinstance(total, bool) or not isinstance(total, int):
            raise ProxyError("upstream_failed", "the gemini upstream token count has no totalTokens")
        return total
