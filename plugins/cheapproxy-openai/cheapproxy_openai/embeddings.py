"""Embeddings (``/v1/embeddings``) on both sides."""

from __future__ import annotations

import base64
import sys
from array import array
from typing import Any

import orjson

from cheapproxy import ir
from cheapproxy.protocol import EncodeContext, UpstreamRequest

from .common import bad_upstream

_SWAP = sys.byteorder == "big"  # the wire format is little-endian float32


def vector_to_base64(vec: list[float]) -> str:
    arr = array("f", vec)
    if _SWAP:
        arr.byteswap()
    return base64.b64encode(arr.tobytes()).decode("ascii")


def vector_from_base64(text: str) -> list[float]:
    arr = array("f")
    arr.frombytes(base64.b64decode(text))
    if _SWAP:
        arr.byteswap()
    return arr.tolist()


def encode_embeddings_response(resp: ir.EmbeddingResponse, ctx: EncodeContext) -> bytes:
    """IR -> client body, honouring the client's ``encoding_format``."""
    fmt = ctx.inbound.body.get("encoding_format") if ctx.inbound is not None else None
    b64 = fmt == "base64"
    data = [
        {"object": "embedding", "index": i, "embedding": vector_to_base64(v) if b64 else v}
        for i, v in enumerate(resp.vectors)
    ]
    prompt = resp.usage.total_input_tokens
    return orjson.dumps(
        {"object": "list", "data": data, "model": ctx.model, "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}
    )


def encode_embeddings_request(req: ir.EmbeddingRequest, upstream_model: str) -> UpstreamRequest:
    """IR -> upstream ``/embeddings`` request."""
    body: dict[str, Any] = {"model": upstream_model, "input": req.inputs}
    if req.dimensions is not None:
        body["dimensions"] = req.dimensions
    # the client's own format: base64 is smaller on the wire, float is what
    # every compatible server understands; both decode below
    if req.encoding_format:
        body["encoding_format"] = req.encoding_format
    if req.user:
        body["user"] = req.user
    return UpstreamRequest(path="/embeddings", body=orjson.dumps(body), headers={"content-type": "application/json"})


def decode_embeddings_response(body: bytes) -> ir.EmbeddingResponse:
    """Upstream body -> IR (float arrays or base64 strings)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_upstream("the upstream returned a body that is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise bad_upstream("the upstream embeddings answer has no data array")
    items = sorted((d for d in data["data"] if isinstance(d, dict)), key=lambda d: d.get("index", 0))
    vectors = []
    for d in items:
        emb = d.get("embedding")
        if isinstance(emb, str):
            vectors.append(vector_from_base64(emb))
        elif isinstance(emb, list):
            vectors.append([float(x) for x in emb])
        else:
            raise bad_upstream("the upstream embeddings answer has an item without an embedding")
    u = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    prompt = u.get("prompt_tokens", u.get("total_tokens", 0))
    return ir.EmbeddingResponse(
        model=str(data.get("model") or ""),
        vectors=vectors,
        usage=ir.Usage(input_tokens=prompt if isinstance(prompt, int) else 0),
    )
