"""Synchronous image generation (``POST /v1/images/generations`` for models
that answer at once), billed like any request: hold, then settle to the usage
reported.

An upstream serves it when its provider type mixes in ``ImageProvider``, or
when it speaks ``openai-chat`` (the OpenAI Images API is relayed: body as is,
model renamed).  Policy: with no usage in the answer (``dall-e-3`` reports
none) the request is charged what was held (estimated prompt tokens plus
``max_output_tokens`` per image), marked ``estimated`` in the usage record.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson

from .. import ir
from ..errors import ProxyError, UpstreamError
from ..events import CallFinished
from ..protocol import UpstreamRequest
from ..storage.base import KeyRecord, UsageRecord
from .base import ImageProvider, ImageResult, TaskProvider, parse_task_body

if TYPE_CHECKING:
    from ..app import Proxy
    from ..catalog import Model, Upstream

MAX_IMAGES = 10


def upstream_image_mode(up: Upstream, upstream_model: str) -> str | None:
    """``sync`` when the upstream answers this model's images at once (an
    ``ImageProvider``, or an ``openai-chat`` upstream: the Images API is
    relayed), ``task`` when it runs them as tasks, else None."""
    p = up.provider
    if isinstance(p, ImageProvider) and p.answers_at_once(upstream_model):
        return "sync"
    if up.protocol is not None and up.protocol.name == "openai-chat":
        return "sync"
    if isinstance(p, TaskProvider) and "image" in p.task_kinds:
        return "task"
    return None


def image_mode(model: Model) -> str | None:
    """The mode of the model's first upstream that can make images."""
    for up in model.upstreams:
        mode = upstream_image_mode(up, model.config.sent_name)
        if mode is not None:
            return mode
    return None


def count(body: dict[str, Any]) -> int:
    n = body.get("n", 1)
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
        raise ProxyError("invalid_request", f"'n' must be a whole number from 1 to {MAX_IMAGES}.", param="n")
    return n


def _usage_from_openai(body: Any) -> ir.Usage | None:
    u = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(u, dict):
        return None
    inp, out = u.get("input_tokens"), u.get("output_tokens")
    if not isinstance(inp, int) and not isinstance(out, int):
        return None
    return ir.Usage(input_tokens=inp if isinstance(inp, int) else 0, output_tokens=out if isinstance(out, int) else 0)


async def _relay_openai(proxy: Proxy, up: Upstream, body: dict[str, Any], upstream_model: str) -> ImageResult:
    payload = {k: v for k, v in body.items() if k != "callback_url"}
    payload["model"] = upstream_model
    client = proxy.clients[up.name]
    resp = await client.send(UpstreamRequest(path="/images/generations", body=orjson.dumps(payload)))
    try:
        # bounded, timed read of the whole body (UpstreamResponse.read_all)
        raw = await resp.read_all() if hasattr(resp, "read_all") else await resp.read()
    finally:
        resp.release()
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamError("upstream_failed", f"upstream {up.name!r} sent an images answer that is not JSON") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("data"), list):
        raise UpstreamError("upstream_failed", f"upstream {up.name!r} sent an images answer without 'data'")
    extra = {k: v for k, v in answer.items() if k in ("background", "output_format", "quality", "size")}
    return ImageResult(data=answer["data"], usage=_usage_from_openai(answer), extra=extra)


async def generate(proxy: Proxy, *, key: KeyRecord, model: Model, body: dict[str, Any], body_bytes: int,
                   request_id: str) -> tuple[bytes, Decimal]:
    """Run one synchronous images request; returns (OpenAI images body, cost)."""
    n = count(body)
    spec = parse_task_body(body, kind="image", model=model.name, upstream_model=model.config.sent_name)
    estimate = getattr(proxy, "estimate_input_tokens", None) or proxy.billing.estimate_input_tokens
    input_estimate = estimate(body_bytes)
    max_out = n * model.config.max_output_tokens
    hold = await proxy.billing.reserve(request_id=request_id, user_id=key.user_id, key=key, scheme=model.scheme,
                                       input_tokens_estimate=input_estimate, max_output_tokens=max_out)
    started = time.perf_counter()
    record = UsageRecord(request_id=request_id, user_id=key.user_id, key_id=key.id, model=model.name, upstream=None,
                         protocol="openai-images", streamed=False, status="ok")
    try:
        result: ImageResult | None = None
        last: ProxyError | None = None
        for up in model.upstreams:  # ordered fallbacks, before anything reached the client
            record.upstream = up.name
            try:
                mode = upstream_image_mode(up, model.config.sent_name)
                if mode == "sync" and isinstance(up.provider, ImageProvider):
                    client = proxy.clients.get(up.name)
                    result = await up.provider.generate_images(client.session if client else None, spec)
                elif mode == "sync" and up.protocol is not None and up.protocol.name == "openai-chat":
                    result = await _relay_openai(proxy, up, body, model.config.sent_name)
                else:
                    continue
                break
            except UpstreamError as err:
                last = err
                if not err.retryable:
                    raise
        if result is None:
            raise last or ProxyError("invalid_request", f"Model '{model.name}' cannot generate images.", param="model")
    except BaseException as exc:
        record.status = "error"
        record.http_status = exc.status if isinstance(exc, ProxyError) else 500
        record.latency_ms = int((time.perf_counter() - started) * 1000)
        await proxy.billing.release(hold, record=record)
        raise
    usage = result.usage
    if usage is None or usage.is_zero():
        usage = ir.Usage(input_tokens=input_estimate, output_tokens=max_out)
        record.usage_source = "estimated"
    record.latency_ms = int((time.perf_counter() - started) * 1000)
    cost = await proxy.billing.settle(hold, scheme=model.scheme, usage=usage, record=record)
    proxy.emit(CallFinished(
        request_id=request_id, user_id=key.user_id, key_id=key.id, model=model.name, upstream=record.upstream,
        protocol=record.protocol, streamed=False, status="ok", http_status=200, usage=usage, cost=cost,
        latency_seconds=record.latency_ms / 1000, ttft_seconds=None, attempts=1))
    out: dict[str, Any] = {"created": int(time.time()), "data": result.data, **result.extra}
    if result.usage is not None:
        out["usage"] = {"input_tokens": result.usage.input_tokens, "output_tokens": result.usage.output_tokens,
                        "total_tokens": result.usage.input_tokens + result.usage.output_tokens}
    return orjson.dumps(out), cost
