"""The request path: read -> authenticate -> resolve model -> key policy ->
rate limit -> hold -> dispatch (relay or translate, with fallbacks) -> settle.

Settlement runs on a task tracked by the app (never only in a handler that a
disconnect or shutdown could cancel), so every hold is settled or released
exactly once.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import attrs
import orjson
import structlog
from aiohttp import web

from . import ir
from .app_keys import REQUEST_ID_KEY
from .auth import authenticate, check_model
from .catalog import Model
from .errors import ProxyError, UpstreamError
from .events import CallFinished, RequestRejected, UpstreamFailed
from .protocol import EncodeContext, Inbound, Protocol, Route
from .sse import SSE_HEADERS
from .storage.base import KeyRecord, UsageRecord
from .upstream import UpstreamClient, backoff_delay, is_read_error, read_error
from .validate import parse_body, requested_max_tokens

if TYPE_CHECKING:
    from .app import Proxy

log = structlog.get_logger("cheapproxy.pipeline")

MAX_TOKENS_CEILING = 10_000_000


@attrs.define(kw_only=True, eq=False)
class Call:
    """Per-request state."""

    request_id: str
    protocol: Protocol
    route: Route
    started: float
    key: KeyRecord | None = None
    model: Model | None = None
    inbound: Inbound | None = None
    stream: bool = False
    upstream: str | None = None
    usage: ir.Usage | None = None
    output_chars: int = 0
    ttft: float | None = None
    status: str = "ok"
    http_status: int = 200
    response_started: bool = False
    hold: Any = None
    cost: Any = None
    body_bytes: int = 0
    ir_request: ir.Request | None = None
    attempts: int = 0


class UsageTracker:
    """Reads usage and counts output from IR events without building a
    Response (cheap per event)."""

    __slots__ = ("usage", "chars", "stop", "error")

    def __init__(self) -> None:
        self.usage: ir.Usage | None = None
        self.chars = 0
        self.stop: ir.MessageStop | None = None
        self.error: ir.StreamError | None = None

    def see(self, ev: ir.StreamEvent) -> None:
        t = ev.type
        if t == "text_delta" or t == "reasoning_delta":
            self.chars += len(ev.text)  # type: ignore[union-attr]
        elif t == "tool_call_delta":
            self.chars += len(ev.arguments)  # type: ignore[union-attr]
        elif t == "usage" or t == "message_start":
            if ev.usage is not None:  # type: ignore[union-attr]
                self.usage = ir.merge_usage(self.usage, ev.usage)  # type: ignore[union-attr]
        elif t == "message_stop":
            self.stop = ev  # type: ignore[assignment]
            if ev.usage is not None:  # type: ignore[union-attr]
                self.usage = ir.merge_usage(self.usage, ev.usage)  # type: ignore[union-attr]
        elif t == "error":
            self.error = ev  # type: ignore[assignment]


def error_response(protocol: Protocol, err: ProxyError, request_id: str) -> web.Response:
    status, body = protocol.encode_error(err)
    headers = {"Content-Type": "application/json"}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(err.retry_after + 0.999)))
    return web.Response(status=status, body=body, headers=headers)


async def handle(proxy: Proxy, protocol: Protocol, route: Route, request: web.Request) -> web.StreamResponse:
    call = Call(request_id=request[REQUEST_ID_KEY], protocol=protocol, route=route, started=time.perf_counter())
    structlog.contextvars.bind_contextvars(request_id=call.request_id)
    try:
        return await _serve(proxy, call, request)
    except ProxyError as err:
        call.status, call.http_status = "error", err.status
        if call.hold is None:
            proxy.emit(RequestRejected(protocol=protocol.name, http_status=err.status, kind=err.kind))
        if call.response_started:
            raise  # already handled in-stream; nothing more can be sent
        return error_response(protocol, err, call.request_id)
    finally:
        _log_call(call)
        structlog.contextvars.clear_contextvars()


def _log_call(call: Call) -> None:
    log.info(
        "request.finished",
        key_id=call.key.id if call.key else None,
        model=call.model.name if call.model else None,
        upstream=call.upstream,
        protocol=call.protocol.name,
        stream=call.stream,
        status=call.http_status,
        outcome=call.status,
        latency_ms=round((time.perf_counter() - call.started) * 1000, 2),
    )


async def _serve(proxy: Proxy, call: Call, request: web.Request) -> web.StreamResponse:
    if proxy.draining:
        raise ProxyError("unavailable", "The gateway is shutting down; retry in a moment.", retry_after=1)
    raw = await read_body(request, proxy.config.server.max_body_bytes)
    call.body_bytes = len(raw)
    body = parse_body(raw)
    call.key = key = await authenticate(request, proxy.keys)
    model_name, stream = call.protocol.inspect(call.route, body, dict(request.match_info), dict(request.query))
    model = proxy.catalog.resolve(model_name) if isinstance(model_name, str) else None
    if model is None:
        raise ProxyError("not_found", f"The model '{model_name}' does not exist or is not served here. GET /v1/models lists the models.",
                         param="model", code="model_not_found")
    call.model, call.stream = model, stream
    check_model(key, model.name, stream=stream)
    op = call.route.operation
    want_kind = "embedding" if op == "embeddings" else "chat"
    if model.config.kind != want_kind:
        raise ProxyError("invalid_request", f"Model '{model.name}' is a {model.config.kind} model and cannot serve {op}.", param="model")
    fwd = call.protocol.forward_headers
    headers = {k: request.headers[k] for k in fwd if k in request.headers} if fwd else {}
    call.inbound = inbound = Inbound(
        model=model_name, stream=stream, operation=op, body=body,
        match_info=dict(request.match_info), query=dict(request.query), headers=headers,
    )
    if op == "count_tokens":
        return await count_tokens(proxy, call)
    proxy.ratelimiter.check(key)
    async with proxy.admission(key):
        return await _billed(proxy, call, request, inbound)


async def read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise ProxyError("payload_too_large", f"Request body is larger than the limit of {limit} bytes.")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ProxyError("payload_too_large", f"Request body is larger than the limit of {limit} bytes.") from None


async def _billed(proxy: Proxy, call: Call, request: web.Request, inbound: Inbound) -> web.StreamResponse:
    assert call.model is not None and call.key is not None
    model = call.model
    if call.route.operation == "embeddings":
        max_out = 0
    else:
        asked = requested_max_tokens(inbound.body)
        if asked is not None and (asked < 0 or asked > MAX_TOKENS_CEILING):
            raise ProxyError("invalid_request", f"max tokens must be between 0 and {MAX_TOKENS_CEILING}.", param="max_tokens")
        max_out = min(asked, model.config.max_output_tokens) if asked else model.config.max_output_tokens
    call.hold = await proxy.billing.reserve(
        request_id=call.request_id, user_id=call.key.user_id, key=call.key, scheme=model.scheme,
        input_tokens_estimate=proxy.estimate_input_tokens(call.body_bytes), max_output_tokens=max_out,
    )
    response: web.StreamResponse | None = None
    try:
        response = await dispatch(proxy, call, request, inbound)
        return response
    except BaseException as exc:
        if isinstance(exc, ProxyError):
            call.status, call.http_status = "error", exc.status
        elif isinstance(exc, asyncio.CancelledError):
            call.status = "cancelled"
        else:
            call.status, call.http_status = "error", 500
        raise
    finally:
        # settle on a tracked task; the handler waits for it unless cancelled
        task = proxy.track(finish_billing(proxy, call))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            pass
        if response is not None and not response.prepared and call.cost is not None:
            response.headers["x-cheapproxy-cost"] = str(call.cost)


async def finish_billing(proxy: Proxy, call: Call) -> None:
    assert call.model is not None and call.key is not None
    usage = call.usage
    source = "upstream"
    if (usage is None or usage.is_zero()) and (call.output_chars or call.response_started):
        # the upstream reported no usage (cut stream, disconnect): the documented
        # local count, ceil(bytes / 4) of the request body and of the output seen
        usage = ir.Usage(input_tokens=max(1, (call.body_bytes + 3) // 4), output_tokens=(call.output_chars + 3) // 4)
        source = "estimated"
    elapsed = time.perf_counter() - call.started
    record = UsageRecord(
        request_id=call.request_id, user_id=call.key.user_id, key_id=call.key.id, model=call.model.name,
        upstream=call.upstream, protocol=call.protocol.name, streamed=call.stream, status=call.status,
        http_status=call.http_status, latency_ms=int(elapsed * 1000),
        ttft_ms=int(call.ttft * 1000) if call.ttft is not None else None, usage_source=source,
    )
    if usage is not None:
        record.input_tokens = usage.input_tokens
        record.output_tokens = usage.output_tokens
        record.cache_read_tokens = usage.cache_read_tokens
        record.cache_write_tokens = usage.cache_write_tokens
        record.reasoning_tokens = usage.reasoning_tokens
    try:
        if usage is not None and not usage.is_zero() and (call.status != "error" or call.response_started or call.output_chars):
            call.cost = await proxy.billing.settle(call.hold, scheme=call.model.scheme, usage=usage, record=record)
            proxy.ratelimiter.add_tokens(call.key.id, usage.total_input_tokens + usage.output_tokens)
        else:
            await proxy.billing.release(call.hold, record=record)
    except Exception:  # noqa: BLE001 - logged; the hold stays open for the sweeper
        log.exception("billing.settle_failed")
        return
    proxy.emit(CallFinished(
        request_id=call.request_id, user_id=call.key.user_id, key_id=call.key.id, model=call.model.name,
        upstream=call.upstream, protocol=call.protocol.name, streamed=call.stream, status=call.status,
        http_status=call.http_status, usage=usage, cost=call.cost, latency_seconds=elapsed,
        ttft_seconds=call.ttft, attempts=call.attempts,
    ))


# ------------------------------------------------------------------ dispatch


def _order(proxy: Proxy, model: Model) -> list[UpstreamClient]:
    clients = [proxy.clients[u.name] for u in model.upstreams]
    now = time.monotonic()
    ready = [c for c in clients if c.breaker.available(now)]
    if len(ready) > 1:
        weights = [c.upstream.config.weight for c in ready]
        if len(set(weights)) > 1:
            ready = proxy.weighted_order(ready)
    # at least one route is always tried, even when all are cooling down
    return ready or [min(clients, key=lambda c: c.breaker.until)]


async def dispatch(proxy: Proxy, call: Call, request: web.Request, inbound: Inbound) -> web.StreamResponse:
    assert call.model is not None
    order = _order(proxy, call.model)
    routing = proxy.config.routing
    deadline = time.monotonic() + routing.deadline_seconds
    max_attempts = len(order) + routing.retries
    last: ProxyError | None = None
    for attempt in range(max_attempts):
        client = order[attempt % len(order)]
        call.upstream = client.name
        call.attempts = attempt + 1
        try:
            resp = await attempt_one(proxy, call, request, inbound, client)
            client.breaker.success()
            return resp
        except UpstreamError as err:
            last = err
            proxy.emit(UpstreamFailed(upstream=client.name, model=call.model.name, kind=err.kind,
                                      upstream_status=err.upstream_status))
            if call.response_started or not err.retryable:
                if not err.retryable and err.upstream_status and err.upstream_status < 500:
                    pass  # the upstream rejected the request itself: not the upstream's fault
                else:
                    _fail(proxy, client)
                raise
            _fail(proxy, client)
            delay = backoff_delay(attempt // max(1, len(order)), err.retry_after if attempt + 1 >= len(order) else None)
            if attempt + 1 >= max_attempts or time.monotonic() + delay >= deadline:
                break
            if attempt + 1 >= len(order) and delay:
                await asyncio.sleep(delay)
    assert last is not None
    if last.kind in ("upstream_failed",) and len(order) > 1:
        last = UpstreamError("upstream_failed", f"every upstream for model '{call.model.name}' failed; last: {last.message}",
                             upstream_status=getattr(last, "upstream_status", None))
    raise last


def _fail(proxy: Proxy, client: UpstreamClient) -> None:
    if client.breaker.failure():
        log.warning("upstream.cooled_down", upstream=client.name, seconds=round(client.breaker.until - time.monotonic(), 2))
        proxy.emit_cooldown(client.name)


def _ctx(call: Call, ir_request: ir.Request | None) -> EncodeContext:
    assert call.inbound is not None
    return EncodeContext(model=call.inbound.model, request_id=call.request_id, created=int(time.time()),
                         request=ir_request, inbound=call.inbound)


async def attempt_one(proxy: Proxy, call: Call, request: web.Request, inbound: Inbound, client: UpstreamClient) -> web.StreamResponse:
    assert call.model is not None
    up = client.upstream
    upstream_model = call.model.config.sent_name
    op = inbound.operation
    same = up.protocol is not None and up.protocol.name == call.protocol.name
    if op == "embeddings":
        return await _embeddings(proxy, call, inbound, client, upstream_model)
    if same:
        return await _relay(proxy, call, request, inbound, client, upstream_model)
    if call.ir_request is None:
        call.ir_request = call.protocol.decode_request(inbound)
        # clamp to the model's limit: clients such as Claude Code ask for 64k,
        # which smaller upstream models reject (protocols.md pitfall 13)
        limit = call.model.config.max_output_tokens
        if call.ir_request.max_tokens is None or call.ir_request.max_tokens > limit:
            call.ir_request.max_tokens = limit
    ir_req = call.ir_request
    ctx = _ctx(call, ir_req)
    if up.protocol is None:
        events = up.provider.generate(ir_req, upstream_model)
        return await _emit_events(call, request, ctx, events, None)
    ureq = up.protocol.encode_request(ir_req, upstream_model, stream=inbound.stream)
    resp = await client.send(ureq)
    if not inbound.stream:
        try:
            body = await resp.read()
        except Exception as exc:  # noqa: BLE001
            if is_read_error(exc):
                raise read_error(exc, client.name) from None
            raise
        finally:
            resp.release()
        answer = up.protocol.decode_response(body)
        call.usage = answer.usage
        answer.model = inbound.model
        out = call.protocol.encode_response(answer, ctx)
        return web.Response(body=out, content_type="application/json")
    decoder = up.protocol.stream_decoder()
    proxy.register_stream(resp)
    try:
        return await _emit_events(call, request, ctx, _decode_stream(client, resp, decoder), resp)
    finally:
        proxy.streams.discard(resp)


async def _decode_stream(client: UpstreamClient, resp: aiohttp.ClientResponse, decoder: Any):  # type: ignore[no-untyped-def]
    first = True
    try:
        while True:
            try:
                chunk = await (client.read_first(resp) if first else resp.content.readany())
            except UpstreamError:
                raise
            except Exception as exc:  # noqa: BLE001
                if is_read_error(exc):
                    err = read_error(exc, client.name)
                    yield ir.StreamError(message=err.message, kind=err.kind, status=err.status)
                    return
                raise
            first = False
            if not chunk:
                for ev in decoder.close():
                    yield ev
                return
            for ev in decoder.feed(chunk):
                yield ev
    finally:
        resp.release()


async def _emit_events(call: Call, request: web.Request, ctx: EncodeContext, events: Any, upstream_resp: Any) -> web.StreamResponse:
    """Drive an IR event stream to the client (streamed or collected)."""
    tracker = UsageTracker()
    if not call.inbound or not call.inbound.stream:
        acc = ir.ResponseAccumulator()
        async for ev in events:
            tracker.see(ev)
            acc.feed(ev)
        call.usage, call.output_chars = tracker.usage, tracker.chars
        if acc.error is not None:
            raise UpstreamError(acc.error.kind, acc.error.message, status=acc.error.status, retryable=not tracker.chars)
        answer = acc.response()
        answer.model = ctx.model
        return web.Response(body=call.protocol.encode_response(answer, ctx), content_type="application/json")
    encoder = call.protocol.stream_encoder(ctx)
    resp: web.StreamResponse | None = None
    try:
        async for ev in events:
            tracker.see(ev)
            if ev.type == "error":
                err = ProxyError(ev.kind, ev.message, status=ev.status)
                if resp is None:
                    raise UpstreamError(ev.kind, ev.message, status=ev.status, retryable=True)
                call.status, call.http_status = "incomplete", ev.status
                await _write(resp, encoder.error(err))
                break
            data = encoder.encode(ev)
            if not data:
                continue
            if resp is None:
                resp = await _start_stream(call, request, encoder.content_type)
                pre = encoder.start()
                if pre:
                    data = pre + data
            await _write(resp, data)
        else:
            if resp is None:
                resp = await _start_stream(call, request, encoder.content_type)
                await _write(resp, encoder.start())
            await _write(resp, encoder.close())
        await resp.write_eof()
    except ClientGone:
        call.status = "cancelled"
    finally:
        call.usage, call.output_chars = tracker.usage, tracker.chars
        if hasattr(events, "aclose"):
            await events.aclose()
    assert resp is not None
    return resp


class ClientGone(Exception):
    """The client disconnected while we were writing."""


async def _write(resp: web.StreamResponse, data: bytes) -> None:
    if not data:
        return
    try:
        await resp.write(data)
    except (ConnectionError, aiohttp.ClientConnectionResetError, RuntimeError) as exc:
        raise ClientGone() from exc


async def _start_stream(call: Call, request: web.Request, content_type: str) -> web.StreamResponse:
    headers = dict(SSE_HEADERS)
    headers["Content-Type"] = content_type
    resp = web.StreamResponse(status=200, headers=headers)
    call.response_started = True
    call.ttft = time.perf_counter() - call.started
    try:
        await resp.prepare(request)
    except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
        raise ClientGone() from exc
    return resp


async def _relay(proxy: Proxy, call: Call, request: web.Request, inbound: Inbound, client: UpstreamClient, upstream_model: str) -> web.StreamResponse:
    """Same protocol: body as-is except the model; SSE passed chunk by chunk."""
    proto = call.protocol
    ureq = proto.passthrough_request(inbound, upstream_model)
    resp = await client.send(ureq)
    if not inbound.stream:
        try:
            body = await resp.read()
        except Exception as exc:  # noqa: BLE001
            if is_read_error(exc):
                raise read_error(exc, client.name) from None
            raise
        finally:
            resp.release()
        call.usage = proto.usage_from_body(body)
        ctype = resp.headers.get("Content-Type", "application/json")
        return web.Response(body=body, headers={"Content-Type": ctype})
    tap = proto.passthrough(inbound, stream=True)
    out: web.StreamResponse | None = None
    proxy.register_stream(resp)
    try:
        first = True
        while True:
            try:
                chunk = await (client.read_first(resp) if first else resp.content.readany())
            except UpstreamError:
                if out is None:
                    raise
                chunk = None
                err = UpstreamError("upstream_timeout", f"upstream {client.name!r} stalled")
            except Exception as exc:  # noqa: BLE001
                if not is_read_error(exc):
                    raise
                err = read_error(exc, client.name)
                if out is None:
                    err.retryable = True
                    raise err from None
                chunk = None
            if chunk is None:
                call.status, call.http_status = "incomplete", err.status
                await _write(out, proto.stream_encoder(_ctx(call, None)).error(err))
                break
            first = False
            if not chunk:
                tail = tap.close()
                if out is None:
                    out = await _start_stream(call, request, resp.headers.get("Content-Type", "text/event-stream"))
                if tail:
                    await _write(out, tail)
                if not tap.complete and not tap.error_message:
                    call.status, call.http_status = "incomplete", 502
                    err = UpstreamError("upstream_failed", f"upstream {client.name!r} closed the stream before it was complete")
                    await _write(out, proto.stream_encoder(_ctx(call, None)).error(err))
                break
            data = tap.feed(chunk)
            if out is None:
                out = await _start_stream(call, request, resp.headers.get("Content-Type", "text/event-stream"))
            if data:
                await _write(out, data)
        await out.write_eof()
    except ClientGone:
        call.status = "cancelled"
        await _drain(proxy, client, resp, tap)
    finally:
        call.usage = tap.usage
        call.output_chars = max(call.output_chars, 1 if tap.output_seen else 0)
        if tap.error_message and call.status == "ok":
            call.status = "incomplete"
        proxy.streams.discard(resp)
        resp.release()
    assert out is not None
    return out


async def _drain(proxy: Proxy, client: UpstreamClient, resp: aiohttp.ClientResponse, tap: Any) -> None:
    """After a client disconnect, read on (bounded by [server] drain_seconds)
    only to learn the upstream's usage, then close the upstream connection."""
    limit = proxy.config.server.drain_seconds
    if limit <= 0:
        return
    try:
        async with asyncio.timeout(limit):
            while not tap.complete:
                chunk = await resp.content.readany()
                if not chunk:
                    break
                tap.feed(chunk)
    except Exception:  # noqa: BLE001 - best effort
        pass


async def _embeddings(proxy: Proxy, call: Call, inbound: Inbound, client: UpstreamClient, upstream_model: str) -> web.StreamResponse:
    up = client.upstream
    ereq = call.protocol.decode_embeddings_request(inbound)
    ctx = _ctx(call, None)
    if up.protocol is None:
        result = await up.provider.embed(ereq, upstream_model)
    else:
        resp = await client.send(up.protocol.encode_embeddings_request(ereq, upstream_model))
        try:
            body = await resp.read()
        finally:
            resp.release()
        result = up.protocol.decode_embeddings_response(body)
    call.usage = result.usage
    result.model = inbound.model
    return web.Response(body=call.protocol.encode_embeddings_response(result, ctx), content_type="application/json")


async def count_tokens(proxy: Proxy, call: Call) -> web.StreamResponse:
    """Token counting is free: the upstream's own counter when it speaks a
    protocol that has one, else the documented local estimate."""
    assert call.model is not None and call.inbound is not None
    ir_req = call.protocol.decode_request(call.inbound)
    ctx = _ctx(call, ir_req)
    for u in call.model.upstreams:
        client = proxy.clients[u.name]
        if u.protocol is None:
            continue
        if u.protocol.name == call.protocol.name:
            # same protocol: relay the body as-is (beta headers, server tools and all)
            ureq = u.protocol.passthrough_request(call.inbound, call.model.config.sent_name)
        else:
            ureq = u.protocol.encode_count_tokens_request(ir_req, call.model.config.sent_name)
        if ureq is None:
            continue
        call.upstream = u.name
        try:
            resp = await client.send(ureq)
            try:
                body = await resp.read()
            finally:
                resp.release()
            n = u.protocol.decode_count_tokens_response(body)
            return web.Response(body=call.protocol.encode_count_tokens(n, ctx), content_type="application/json")
        except UpstreamError as err:
            if not err.retryable:
                raise
    n = local_count(ir_req)
    return web.Response(body=call.protocol.encode_count_tokens(n, ctx), content_type="application/json")


def local_count(req: ir.Request) -> int:
    """Local estimate: ceil(utf-8 bytes / 4) of every text, tool schema and tool argument."""
    size = 0
    for p in req.system:
        size += len(p.text.encode())
    for m in req.messages:
        for part in m.content:
            if isinstance(part, (ir.TextPart, ir.ReasoningPart)):
                size += len(part.text.encode())
            elif isinstance(part, ir.ToolCallPart):
                size += len(part.name) + len(part.arguments.encode())
            elif isinstance(part, ir.ToolResultPart):
                for c in part.content:
                    if isinstance(c, ir.TextPart):
                        size += len(c.text.encode())
            elif isinstance(part, ir.ImagePart):
                size += 1600 * 4  # a typical image costs on the order of 1,600 tokens
    for t in req.tools:
        size += len(t.name) + len((t.description or "").encode()) + len(orjson.dumps(t.parameters))
    return max(1, (size + 3) // 4)
