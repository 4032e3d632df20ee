"""The request path: read -> authenticate -> resolve model -> key policy ->
rate limit -> hold -> dispatch (relay or translate, with fallbacks) -> settle.

Settlement runs on a task tracked by the app (never only in a handler that a
disconnect or shutdown could cancel), so every hold is settled or released
exactly once.  Streaming itself lives in relay.py; timeouts, the pool and the
breaker in upstream.py; the rules are written up in docs/reliability.md.
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
from .app_keys import PROXY_KEY, REQUEST_ID_KEY
from .auth import authenticate, check_model
from .catalog import Model
from .errors import StorageError, ProxyError, UpstreamError
from .logging import REQUEST_ID, info_line
from .events import CallFinished, RequestRejected, UpstreamFailed
from .protocol import EncodeContext, Inbound, Protocol, Route
from .relay import ClientGone, ProviderEvents, UpstreamEvents, emit_events, interrupted_error, relay_stream
from .storage.base import KeyRecord, UsageRecord
from .upstream import UpstreamClient, UpstreamResponse, backoff_delay, counts_against, unsafe_text
from .validate import check_routing_fields, parse_body, requested_choices, requested_max_tokens
from .watch import absorb

if TYPE_CHECKING:
    from .app import Proxy

log = structlog.get_logger("cheapproxy.pipeline")

MAX_TOKENS_CEILING = 10_000_000
HOLD_TOKENS_CEILING = 10**9  # pricing.MAX_TOKENS: n * max_tokens saturates here


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
    usage_complete: bool = False  # the upstream's end marker (with its final usage) went by
    output_chars: int = 0
    ttft: float | None = None
    status: str = "ok"  # ok | error | incomplete | cancelled
    http_status: int = 200
    error: str | None = None
    error_kind: str | None = None  # kind of the error that ended the call (breaker bookkeeping)
    response_started: bool = False
    hold: Any = None
    cost: Any = None
    body_bytes: int = 0
    ir_request: ir.Request | None = None
    attempts: int = 0
    deadline: float | None = None  # loop time: the end of the budget for all attempts
    interrupt: str | None = None  # set by the CallWatcher before it cancels the handler
    interrupt_absorbed: bool = False

    def new_attempt(self) -> None:
        """What a failed attempt read is never billed: only the one that served."""
        self.usage, self.usage_complete, self.output_chars = None, False, 0


def error_response(protocol: Protocol, err: ProxyError, request_id: str) -> web.Response:
    status, body = protocol.encode_error(err)
    headers = {"Content-Type": "application/json"}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(err.retry_after + 0.999)))
    return web.Response(status=status, body=body, headers=headers)


async def handle(proxy: Proxy, protocol: Protocol, route: Route, request: web.Request) -> web.StreamResponse:
    call = Call(request_id=request[REQUEST_ID_KEY], protocol=protocol, route=route, started=time.perf_counter())
    token = REQUEST_ID.set(call.request_id)
    try:
        return await _serve(proxy, call, request)
    except ClientGone as gone:
        call.status, call.http_status, call.error = "cancelled", 499, gone.message
        return web.Response(status=499)  # nobody is listening; aiohttp drops it
    except StorageError:
        # the database is down or locked: fail closed, in the client's shape
        log.exception("request.storage_failed")
        err = ProxyError("unavailable", "The gateway's database is unavailable; retry in a moment.", retry_after=1)
        call.status, call.http_status, call.error = "error", err.status, err.message
        if call.response_started:
            raise
        return error_response(protocol, err, call.request_id)
    except ProxyError as err:
        call.status, call.http_status, call.error = "error", err.status, err.message
        if call.hold is None:
            proxy.emit(RequestRejected(protocol=protocol.name, http_status=err.status, kind=err.kind))
        if call.response_started:
            raise  # already handled in-stream; nothing more can be sent
        return error_response(protocol, err, call.request_id)
    except Exception:
        # a bug (ours or a plugin's) costs this request, never the worker; the
        # client still gets its protocol's error shape
        log.exception("request.crashed")
        call.status, call.http_status = "error", 500
        if call.response_started:
            raise
        err = ProxyError("internal", f"The gateway failed to handle this request (request id {call.request_id}).")
        return error_response(protocol, err, call.request_id)
    finally:
        _log_call(call)
        REQUEST_ID.reset(token)


def _log_call(call: Call) -> None:
    fields = {
        "request_id": call.request_id,
        "key_id": call.key.id if call.key else None,
        "model": call.model.name if call.model else None,
        "upstream": call.upstream,
        "protocol": call.protocol.name,
        "stream": call.stream,
        "status": call.http_status,
        "outcome": call.status,
        "attempts": call.attempts,
        "error": call.error,
        "latency_ms": round((time.perf_counter() - call.started) * 1000, 2),
    }
    if not info_line("request.finished", fields):
        log.info("request.finished", **fields)


async def _serve(proxy: Proxy, call: Call, request: web.Request) -> web.StreamResponse:
    if proxy.draining:
        raise ProxyError("unavailable", "The gateway is shutting down; retry in a moment.", retry_after=1)
    raw = await read_body(request, proxy.config.server.max_body_bytes)
    call.body_bytes = len(raw)
    body = parse_body(raw)
    call.key = key = await authenticate(request, proxy.keys)
    check_routing_fields(body)
    # (parsing the query string costs: only when there is one)
    match_info, query = dict(request.match_info), dict(request.query) if "?" in request.raw_path else {}
    model_name, stream = call.protocol.inspect(call.route, body, match_info, query)
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
    # only the protocol's allowlist (e.g. anthropic-beta) may reach an upstream header
    fwd = call.protocol.forward_headers
    headers = {k: request.headers[k] for k in fwd if k in request.headers} if fwd else {}
    if any(unsafe_text(v) for v in headers.values()):
        raise ProxyError("invalid_request", "A forwarded header contains CR, LF or NUL.")
    call.inbound = inbound = Inbound(
        model=model_name, stream=stream, operation=op, body=body,
        match_info=match_info, query=query, headers=headers,
    )
    if op == "count_tokens":
        return await count_tokens(proxy, call)
    if key.rpm or key.tpm:
        await proxy.ratelimiter.admit(key)
    with proxy.admission(key):
        return await _billed(proxy, call, request, inbound)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body: 413 over ``limit``, 408 when it does not arrive within
    ``[server] body_timeout_seconds`` (slow-body clients)."""
    if request.content_length is not None and request.content_length > limit:
        raise ProxyError("payload_too_large", f"Request body is larger than the limit of {limit} bytes.")
    proxy = request.app.get(PROXY_KEY)
    timeout = proxy.config.server.body_timeout_seconds if proxy is not None else 30.0
    try:
        content = request.content
        if content.is_eof():
            # the usual case: the whole body came with the head and is
            # buffered; take it as is (request.read() awaits twice and copies)
            raw = content.read_nowait()
            if len(raw) > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(raw))
            return raw
        async with asyncio.timeout(timeout):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ProxyError("payload_too_large", f"Request body is larger than the limit of {limit} bytes.") from None
    except TimeoutError:
        raise ProxyError("invalid_request", f"The request body did not arrive within {timeout:g}s.", status=408) from None
    except (ConnectionError, aiohttp.ClientConnectionResetError):
        raise ClientGone("the client left while sending its body") from None


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
        # n answers cost n times the output: the hold covers all of them
        max_out = min(max_out * requested_choices(inbound.body), HOLD_TOKENS_CEILING)
    call.hold = await proxy.billing.reserve(
        request_id=call.request_id, user_id=call.key.user_id, key=call.key, scheme=model.scheme,
        input_tokens_estimate=proxy.estimate_input_tokens(call.body_bytes), max_output_tokens=max_out,
    )
    response: web.StreamResponse | None = None
    try:
        response = await dispatch(proxy, call, request, inbound)
        return response
    except BaseException as exc:
        if isinstance(exc, ClientGone):
            call.status, call.http_status = "cancelled", 499
        elif isinstance(exc, ProxyError):
            call.status, call.http_status = "error", exc.status
        elif isinstance(exc, asyncio.CancelledError):
            call.status = "cancelled"
        else:
            call.status, call.http_status = "error", 500
        raise
    finally:
        try:
            fut = settle_now(proxy, call)
        except Exception:  # noqa: BLE001 - a pricing bug must not cost the answer; the hold stays for the sweeper
            log.exception("billing.settle_failed")
            fut = _FAILED
        if fut is _FAILED:
            pass
        elif fut is not None:
            # the charge is queued and belongs to the batch task: waiting for
            # its commit (so it is durable before the response ends) is all
            # that is left here, and a cancelled wait loses nothing
            try:
                await fut
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - the hold stays open for the sweeper
                log.exception("billing.settle_failed")
        else:
            # the general path: settle on a tracked task; wait for it unless cancelled
            task = proxy.track(finish_billing(proxy, call))
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                pass
        if response is not None and not response.prepared and call.cost is not None:
            response.headers["x-cheapproxy-cost"] = str(call.cost)


_FAILED: Any = object()  # settle_now raised: logged, nothing more to do


def billable_usage(call: Call) -> tuple[ir.Usage | None, str]:
    """The usage to charge and its source (docs/reliability.md, "billing").

    * nothing reached the client (an error or a disconnect before the first
      byte): nothing is charged;
    * a complete answer: the upstream's usage (a local estimate only when it
      reported none);
    * a stream that ended early (upstream cut, stall, client gone, shutdown):
      what was streamed: the upstream's counts so far, each raised to the local
      estimate (prompt: ceil(body bytes / 4), output: ceil(characters / 4)).
    """
    usage = call.usage
    delivered = call.response_started or call.status == "ok"
    if not delivered:
        return None, "upstream"
    partial = call.response_started and call.status in ("incomplete", "cancelled") and not call.usage_complete
    if usage is not None and not partial and not usage.is_zero():
        return usage, "upstream"  # the usual case: a complete answer with the upstream's usage
    estimate = ir.Usage(input_tokens=max(1, (call.body_bytes + 3) // 4), output_tokens=(call.output_chars + 3) // 4)
    if usage is None or usage.is_zero():
        if call.output_chars or call.response_started:
            return estimate, "estimated"
        return usage, "upstream"
    if partial:
        raised = attrs.evolve(
            usage,
            input_tokens=usage.input_tokens or (0 if usage.total_input_tokens else estimate.input_tokens),
            output_tokens=max(usage.output_tokens, estimate.output_tokens),
        )
        return raised, ("upstream" if raised == usage else "estimated")
    return usage, "upstream"


def _record(call: Call) -> tuple[ir.Usage | None, UsageRecord, float]:
    assert call.model is not None and call.key is not None
    usage, source = billable_usage(call)
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
    return usage, record, elapsed


def _finished(proxy: Proxy, call: Call, usage: ir.Usage | None, elapsed: float) -> None:
    assert call.model is not None and call.key is not None
    proxy.emit(CallFinished(
        request_id=call.request_id, user_id=call.key.user_id, key_id=call.key.id, model=call.model.name,
        upstream=call.upstream, protocol=call.protocol.name, streamed=call.stream, status=call.status,
        http_status=call.http_status, usage=usage, cost=call.cost, latency_seconds=elapsed,
        ttft_seconds=call.ttft, attempts=call.attempts,
    ))


def settle_now(proxy: Proxy, call: Call) -> asyncio.Future[Any] | None:
    """Settle without a task when the billing queues charges (leases): the
    charge is priced and queued here, the rate limiter and CallFinished follow
    its commit.  None: use ``finish_billing`` on a tracked task."""
    settle_nowait = getattr(proxy.billing, "settle_nowait", None)
    if settle_nowait is None or call.model is None or call.key is None:
        return None
    usage, record, elapsed = _record(call)
    charged = usage if usage is not None and not usage.is_zero() else None
    key = call.key

    def after(cost: Any) -> None:
        if charged is not None:
            call.cost = cost
            _count_tokens(proxy, key, charged)
        _finished(proxy, call, usage, elapsed)

    return settle_nowait(call.hold, scheme=call.model.scheme, usage=charged, record=record, after=after)


def _count_tokens(proxy: Proxy, key: KeyRecord, usage: ir.Usage) -> None:
    """Tokens count against the key's tpm (only a key with one is counted)."""
    if key.tpm:
        proxy.ratelimiter.add_tokens(key.id, usage.total_input_tokens + usage.output_tokens)


async def finish_billing(proxy: Proxy, call: Call) -> None:
    assert call.model is not None and call.key is not None
    usage, record, elapsed = _record(call)
    try:
        if usage is not None and not usage.is_zero():
            call.cost = await proxy.billing.settle(call.hold, scheme=call.model.scheme, usage=usage, record=record)
            _count_tokens(proxy, call.key, usage)
        else:
            await proxy.billing.release(call.hold, record=record)
    except Exception:  # noqa: BLE001 - logged; the hold stays open for the sweeper
        log.exception("billing.settle_failed")
        return
    _finished(proxy, call, usage, elapsed)


# ------------------------------------------------------------------ dispatch


def _order(proxy: Proxy, model: Model) -> list[UpstreamClient]:
    clients = [proxy.clients[u.name] for u in model.upstreams]
    now = time.monotonic()
    ready = [c for c in clients if c.breaker.available(now)]
    if len(ready) > 1:
        weights = [c.upstream.config.weight for c in ready]
        if len(set(weights)) > 1:
            ready = proxy.weighted_order(ready)
    # at least one route is always tried: when every upstream is cooling down,
    # all of them, soonest readmitted first (Envoy's panic routing)
    return ready or sorted(clients, key=lambda c: c.breaker.until)


async def dispatch(proxy: Proxy, call: Call, request: web.Request, inbound: Inbound) -> web.StreamResponse:
    """Attempts with fallback and retry, while the watcher may interrupt the
    wait if the client leaves or the gateway shuts down."""
    with proxy.watcher.watching(request, call):
        try:
            return await _attempts(proxy, call, request, inbound)
        except asyncio.CancelledError:
            reason = absorb(call)
            if reason is None:
                raise
            raise interrupted_error(reason) from None


async def _attempts(proxy: Proxy, call: Call, request: web.Request, inbound: Inbound) -> web.StreamResponse:
    """Before the first byte reached the client: connection errors, timeouts,
    429 and 5xx go to the next upstream in order, then round again (after a
    jittered back-off or the upstream's Retry-After), within
    ``[routing] deadline_seconds``, ``retries`` and each upstream's retry
    budget.  After the first byte nothing is retried."""
    assert call.model is not None
    order = _order(proxy, call.model)
    routing = proxy.config.routing
    loop = proxy.loop or asyncio.get_running_loop()  # (asking asyncio costs a getpid() syscall)
    call.deadline = loop.time() + routing.deadline_seconds
    n = len(order)
    max_attempts = n + routing.retries
    last: UpstreamError | None = None
    round_wait: float | None = None  # the longest Retry-After heard in this round
    for attempt in range(max_attempts):
        client = order[attempt % n]
        if attempt < n:
            client.budget.deposit()
        elif not client.budget.withdraw():
            log.warning("upstream.retry_budget_exhausted", upstream=client.name)
            break
        call.upstream, call.attempts = client.name, attempt + 1
        call.new_attempt()
        try:
            resp = await attempt_one(proxy, call, request, inbound, client)
            if call.status == "incomplete" and (call.error_kind or "").startswith("upstream_"):
                breaker_failed(proxy, client)  # served, then cut or stalled mid-stream: still a sign of trouble
            else:
                client.breaker.success()
            return resp
        except UpstreamError as err:
            last = err
            proxy.emit(UpstreamFailed(upstream=client.name, model=call.model.name, kind=err.kind,
                                      upstream_status=err.upstream_status))
            if counts_against(err):
                breaker_failed(proxy, client)
            if call.response_started or not err.retryable:
                raise
            if err.retry_after is not None:
                round_wait = max(round_wait or 0.0, err.retry_after)
        nxt = attempt + 1
        if nxt >= max_attempts:
            break
        if nxt % n == 0:  # a whole round failed: wait before going round again
            delay = backoff_delay(nxt // n - 1, round_wait)
            round_wait = None
            if delay > routing.retry_after_max_seconds or loop.time() + delay >= call.deadline:
                break  # the client gets the error (with Retry-After) rather than a longer wait
            if delay:
                await asyncio.sleep(delay)
        if loop.time() >= call.deadline:
            break
    assert last is not None
    if last.kind == "upstream_failed" and n > 1:
        last = UpstreamError("upstream_failed", f"every upstream for model '{call.model.name}' failed; last: {last.message}",
                             upstream_status=last.upstream_status)
    raise last


def breaker_failed(proxy: Proxy, client: UpstreamClient) -> None:
    """Count a failure against the upstream's breaker; log and announce a cool-down it starts."""
    if client.breaker.failure():
        log.warning("upstream.cooled_down", upstream=client.name, seconds=round(client.breaker.until - time.monotonic(), 2))
        proxy.emit_cooldown(client.name)


def _ctx(call: Call, ir_request: ir.Request | None) -> EncodeContext:
    assert call.inbound is not None
    return EncodeContext(model=call.inbound.model, request_id=call.request_id, created=int(time.time()),
                         request=ir_request, inbound=call.inbound)


async def _read_body(resp: UpstreamResponse) -> bytes:
    """A non-streamed answer: nothing reached the client yet, so even a cut in
    the middle of the body may be retried."""
    try:
        return await resp.read_all()
    except UpstreamError as err:
        err.retryable = True
        raise
    finally:
        resp.release()


def _decode(fn: Any, *args: Any) -> Any:
    """An upstream's unreadable body is the upstream's failure (502), not ours."""
    try:
        return fn(*args)
    except ProxyError:
        raise
    except Exception:  # noqa: BLE001
        log.warning("upstream.malformed_response", exc_info=True)
        raise UpstreamError("upstream_failed", "the upstream sent a response that could not be read", retryable=True) from None


async def attempt_one(proxy: Proxy, call: Call, request: web.Request, inbound: Inbound, client: UpstreamClient) -> web.StreamResponse:
    assert call.model is not None
    up = client.upstream
    upstream_model = call.model.config.sent_name
    if inbound.operation == "embeddings":
        return await _embeddings(call, inbound, client, upstream_model)
    if up.protocol is not None and up.protocol.name == call.protocol.name:
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
    cfg = up.config
    if up.protocol is None:
        source: Any = ProviderEvents(up.provider.generate(ir_req, upstream_model), cfg.first_byte_timeout,
                                     cfg.idle_timeout, client.name)
        return await emit_events(proxy, call, request, ctx, source)
    ureq = up.protocol.encode_request(ir_req, upstream_model, stream=inbound.stream)
    resp = await client.send(ureq, deadline=call.deadline)
    if not inbound.stream:
        answer = _decode(up.protocol.decode_response, await _read_body(resp))
        call.usage, call.usage_complete = answer.usage, True
        answer.model = inbound.model
        out = call.protocol.encode_response(answer, ctx)
        return web.Response(body=out, content_type="application/json")
    proxy.register_stream(resp)
    try:
        return await emit_events(proxy, call, request, ctx, UpstreamEvents(resp, up.protocol.stream_decoder()))
    finally:
        proxy.streams.discard(resp)


async def _relay(proxy: Proxy, call: Call, request: web.Request, inbound: Inbound, client: UpstreamClient,
                 upstream_model: str) -> web.StreamResponse:
    """Same protocol: body as-is except the model; SSE passed chunk by chunk."""
    proto = call.protocol
    resp = await client.send(proto.passthrough_request(inbound, upstream_model), deadline=call.deadline)
    if not inbound.stream:
        body = await _read_body(resp)
        call.usage, call.usage_complete = _decode(proto.usage_from_body, body), True
        call.output_chars = len(body)
        ctype = resp.raw.header(b"content-type")  # no header mapping built
        return web.Response(body=body, headers={"Content-Type": ctype.decode("latin-1") if ctype else "application/json"})
    return await relay_stream(proxy, call, request, resp, proto.passthrough(inbound, stream=True), _ctx(call, None))


async def _embeddings(call: Call, inbound: Inbound, client: UpstreamClient, upstream_model: str) -> web.StreamResponse:
    up = client.upstream
    ereq = call.protocol.decode_embeddings_request(inbound)
    ctx = _ctx(call, None)
    if up.protocol is None:
        result = await up.provider.embed(ereq, upstream_model)
    else:
        resp = await client.send(up.protocol.encode_embeddings_request(ereq, upstream_model), deadline=call.deadline)
        result = _decode(up.protocol.decode_embeddings_response, await _read_body(resp))
    call.usage, call.usage_complete = result.usage, True
    result.model = inbound.model
    return web.Response(body=call.protocol.encode_embeddings_response(result, ctx), content_type="application/json")


async def count_tokens(proxy: Proxy, call: Call) -> web.StreamResponse:
    """Token counting is free: the upstream's own counter when it speaks a
    protocol that has one, else the documented local estimate."""
    assert call.model is not None and call.inbound is not None
    ir_req = call.protocol.decode_request(call.inbound)
    ctx = _ctx(call, ir_req)
    deadline = asyncio.get_running_loop().time() + proxy.config.routing.deadline_seconds
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
            resp = await client.send(ureq, deadline=deadline)
            n = _decode(u.protocol.decode_count_tokens_response, await _read_body(resp))
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
