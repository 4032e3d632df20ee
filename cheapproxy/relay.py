"""Streaming a response to the client: same-protocol relay, IR events through
an encoder, bounded writes, and the drain after a client disconnect.

Rules (docs/reliability.md):

* nothing is written to the client before the first upstream chunk: until
  then a failure raises UpstreamError and the dispatcher may retry or fall
  over; after it, a failure becomes the protocol's in-stream error event and
  the stream ends (never a fake clean end, never a second copy of the text);
* every write is bounded by ``[server] send_timeout_seconds``: a client that
  stops reading is cut off instead of pinning the upstream; aiohttp's write
  drains at the transport's high-water mark, so a slow reader pushes back on
  the upstream read loop instead of growing a buffer;
* a client that leaves mid-stream: the upstream is read on for at most
  ``[server] drain_seconds`` to learn its usage, then closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

import aiohttp
import structlog
from aiohttp import web

from . import h1, ir
from .errors import ProxyError, UpstreamError
from .protocol import EncodeContext, Passthrough
from .sse import SSE_HEADERS
from .upstream import UpstreamResponse
from .watch import SHUTDOWN, absorb

if TYPE_CHECKING:
    from .app import Proxy
    from .pipeline import Call

log = structlog.get_logger("cheapproxy.relay")


class ClientGone(ProxyError):
    """The client disconnected (or stopped reading); nothing more can be sent."""

    def __init__(self, message: str = "the client closed the connection") -> None:
        super().__init__("client_closed", message, status=499)


def interrupted_error(reason: str) -> ProxyError:
    if reason == SHUTDOWN:
        return ProxyError("unavailable", "The gateway is shutting down; retry in a moment.", retry_after=1)
    return ClientGone()


def shutdown_error() -> ProxyError:
    return ProxyError("unavailable", "The gateway is shutting down; this stream was ended before it was complete.",
                      status=503)


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
        elif t == "text_run":
            self.chars += sum(map(len, ev.texts))  # type: ignore[union-attr]
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


# ------------------------------------------------------------------ event sources


def _stream_error(err: ProxyError) -> ir.StreamError:
    return ir.StreamError(message=err.message, kind=err.kind, status=err.status)


class UpstreamEvents:
    """IR events decoded from an upstream response, one read at a time (a
    plain object, not a generator, so an interrupt between reads loses no
    decoder state and the drain can go on)."""

    def __init__(self, resp: UpstreamResponse, decoder: Any) -> None:
        self.resp = resp
        self.decoder = decoder
        self.done = False
        self.detached = False  # the rest of the body is read by a task of its own

    def rest_aside(self, proxy: Proxy) -> None:
        """The answer is whole (MessageStop went by): read no further here.
        What the upstream sent after its end marker is read off now, or, when
        its body has not ended yet, on the side for at most drain_seconds (so
        the connection can be reused), then released."""
        self.done = True
        if not _rest_here(self.resp):
            self.detached = True
            proxy.track(_read_rest(proxy, self.resp))

    async def next(self) -> list[ir.StreamEvent] | None:
        if self.done:
            return None
        try:
            chunk = await self.resp.read_chunk()
        except UpstreamError as err:
            self.done = True
            return [_stream_error(err)]
        if not chunk:
            self.done = True
            return self._decode(self.decoder.close)
        return self._decode(self.decoder.feed, chunk)

    def _decode(self, fn: Any, *args: Any) -> list[ir.StreamEvent]:
        # an upstream's garbage (or a decoder bug) ends the stream with a 502, never a 500
        try:
            return list(fn(*args))
        except ProxyError as err:
            self.done = True
            return [_stream_error(err)]
        except Exception:  # noqa: BLE001
            self.done = True
            log.warning("upstream.malformed_stream", upstream=self.resp.client.name, exc_info=True)
            return [ir.StreamError(message=f"upstream {self.resp.client.name!r} sent a stream that could not be read",
                                   kind="upstream_failed", status=502)]

    async def aclose(self) -> None:
        if not self.detached:
            self.resp.release()


class ProviderEvents:
    """IR events from a provider plugin without an HTTP protocol (the demo),
    bounded by the upstream's first-byte and idle timeouts like HTTP ones, so
    a hung plugin becomes a 504."""

    def __init__(self, agen: AsyncIterator[ir.StreamEvent], first_byte: float, idle: float, name: str) -> None:
        self.agen = agen
        self.first_byte, self.idle, self.name = first_byte, idle, name
        self.started = False
        self.done = False

    async def next(self) -> list[ir.StreamEvent] | None:
        if self.done:
            return None
        try:
            async with asyncio.timeout(self.idle if self.started else self.first_byte):
                ev = await self.agen.__anext__()
        except StopAsyncIteration:
            self.done = True
            return None
        except TimeoutError:
            self.done = True
            return [ir.StreamError(message=f"provider {self.name!r} produced nothing for "
                                   f"{self.idle if self.started else self.first_byte:g}s", kind="upstream_timeout", status=504)]
        except ProxyError as err:
            self.done = True
            return [_stream_error(err)]
        except Exception:  # noqa: BLE001 - a plugin bug ends this stream, not the worker
            self.done = True
            log.exception("provider.failed", upstream=self.name)
            return [ir.StreamError(message=f"provider {self.name!r} failed", kind="upstream_failed", status=502)]
        self.started = True
        return [ev]

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.agen.aclose()  # type: ignore[attr-defined]


# ------------------------------------------------------------------ client side


_SAMPLE = 4096  # bytes of a stream's first output read kept to size its frames

_FRAMING = 8192  # room for what a write adds: chunk framing, and the response head on the first one


async def _bounded_write(transport: Any, timeout: float, write: Any, data: bytes) -> None:
    """``await write(data)``, cut off when the client has not read for
    ``timeout`` seconds: the transport is aborted (dropping the unsent
    buffer) and TimeoutError raised."""
    # aiohttp's write waits only while the transport has paused writing,
    # i.e. holds more than its high-water mark unsent (64 KiB by default);
    # with nothing unsent and a write (plus chunk framing) below the mark
    # it cannot get paused, so the usual write needs no timer (~4 µs)
    if (transport is not None and transport.get_write_buffer_size() == 0
            and len(data) + _FRAMING < transport.get_write_buffer_limits()[1]):
        await write(data)
        return
    try:
        async with asyncio.timeout(timeout):
            await write(data)
    except TimeoutError:
        if transport is not None:
            transport.abort()
        raise


class _EventStreamResponse(web.StreamResponse):
    """A streamed answer whose end (the last chunk of the chunked body) is
    written by aiohttp after the handler has returned -- that is, after the
    pipeline has waited for the request's charge to commit: a response never
    ends before its charge would survive a crash of the process.  The bytes
    themselves leave at once (the time to the first byte is not the commit's).
    The head leaves with the first chunk (one write, not two), as aiohttp's
    own Response does."""

    _send_headers_immediately = False

    def __init__(self, *, send_timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.send_timeout = send_timeout

    async def write_eof(self, data: bytes = b"") -> None:
        req = self._req
        try:
            await _bounded_write(req.transport if req is not None else None, self.send_timeout, super().write_eof, data)
        except TimeoutError:
            raise ConnectionResetError(f"the client did not read for {self.send_timeout:g}s (send_timeout)") from None


class Sink:
    """The client side of one streamed response."""

    __slots__ = ("call", "request", "send_timeout", "out")

    def __init__(self, call: Call, request: web.Request, send_timeout: float) -> None:
        self.call, self.request, self.send_timeout = call, request, send_timeout
        self.out: _EventStreamResponse | None = None

    async def start(self, content_type: str) -> None:
        headers = dict(SSE_HEADERS)
        headers["Content-Type"] = content_type
        out = _EventStreamResponse(status=200, headers=headers, send_timeout=self.send_timeout)
        self.out = out
        try:
            await out.prepare(self.request)
        except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
            raise ClientGone() from exc
        # from here on nothing may be retried (the client has our headers)
        self.call.response_started = True
        self.call.ttft = time.perf_counter() - self.call.started

    async def write(self, data: bytes) -> None:
        if not data or self.out is None:
            return
        try:
            await _bounded_write(self.request.transport, self.send_timeout, self.out.write, data)
        except TimeoutError:
            raise ClientGone(f"the client did not read for {self.send_timeout:g}s (send_timeout)") from None
        except (ConnectionError, aiohttp.ClientConnectionResetError, RuntimeError) as exc:
            raise ClientGone() from exc

    async def finish(self, data: bytes = b"") -> None:
        """The last bytes of the response; its end follows once the charge is
        durable (see _EventStreamResponse)."""
        await self.write(data)

    async def fail(self, err: ProxyError, data: bytes) -> None:
        """Send the protocol's in-stream error event; the stream then ends."""
        call = self.call
        call.status, call.http_status = "incomplete", err.status
        call.error, call.error_kind = err.message, err.kind
        with contextlib.suppress(ClientGone):
            await self.write(data)


def _send_timeout(proxy: Proxy) -> float:
    return proxy.config.server.send_timeout_seconds


# ------------------------------------------------------------------ same protocol


async def relay_stream(proxy: Proxy, call: Call, request: web.Request, resp: UpstreamResponse, tap: Passthrough,
                       ctx: EncodeContext) -> web.StreamResponse:
    """Same protocol: SSE passed chunk by chunk, usage read on the way."""
    proto = call.protocol
    sink = Sink(call, request, _send_timeout(proxy))
    raw_ctype = resp.raw.header(b"content-type")  # no header mapping built
    ctype = raw_ctype.decode("latin-1") if raw_ctype else "text/event-stream"
    proxy.register_stream(resp)
    # for the estimate of a stream cut short (the bytes are not decoded): the
    # bytes sent since output began, and the mean frame size in the start of
    # the first read with output -- an upstream sends about one token per delta
    # frame (counted only when needed: a count over a whole read costs more
    # than the rest of the relay's work on it)
    sent = 0
    sample = b""
    detached = False  # the upstream's end is read by a task of its own
    try:
        try:
            while True:
                try:
                    chunk = await resp.read_chunk()
                except UpstreamError as err:
                    if sink.out is None:
                        raise  # nothing reached the client: the dispatcher may retry
                    await sink.fail(err, proto.stream_encoder(ctx).error(err))
                    break
                if not chunk:
                    tail = tap.close()
                    if sink.out is None:
                        await sink.start(ctype)
                    await sink.finish(tail)
                    if not tap.complete and not tap.error_message:
                        err = UpstreamError("upstream_failed", f"upstream {resp.client.name!r} closed the stream before it was complete")
                        await sink.fail(err, proto.stream_encoder(ctx).error(err))
                    break
                data = tap.feed(chunk)
                if tap.output_seen:
                    if not sample:
                        sample = data[:_SAMPLE]
                    sent += len(data)
                if sink.out is None:
                    await sink.start(ctype)
                if tap.ended:
                    # the end marker went by: this read is the last the
                    # client gets (the end of the body follows once the charge
                    # is durable); what follows upstream is not for the
                    # client, and is read off on the side unless it is already
                    # here (so the connection can be reused)
                    await sink.finish(data)
                    if not _rest_here(resp):
                        detached = True
                        proxy.track(_read_rest(proxy, resp))
                    break
                await sink.write(data)
        except asyncio.CancelledError:
            if sink.out is None:
                raise  # before the first byte: the dispatcher answers the interrupt
            reason = absorb(call)
            if reason is None:
                raise
            if reason == SHUTDOWN:
                await sink.fail(shutdown_error(), proto.stream_encoder(ctx).error(shutdown_error()))
            else:
                await _relay_gone(proxy, call, resp, tap)
        except ClientGone:
            await _relay_gone(proxy, call, resp, tap)
    finally:
        call.usage = tap.usage
        call.usage_complete = tap.complete
        if tap.output_seen and (not tap.complete or tap.usage is None or tap.usage.is_zero()):
            # the output is estimated (billable_usage): about a token per frame
            # sent, 4 characters making a token in the estimate
            frames = sample.count(b"\n\n") or sample.count(b"\r\n\r\n") or 1
            frame_size = max(len(sample) // frames, 1)
            call.output_chars = max(call.output_chars, 4 * (sent // frame_size), 1)
        if tap.error_message and call.status == "ok":
            call.status, call.error = "incomplete", tap.error_message
        if not detached:
            proxy.streams.discard(resp)
            resp.release()
    assert sink.out is not None
    return sink.out


def _rest_here(resp: UpstreamResponse) -> bool:
    """Read off what the upstream sent after the protocol's end marker; True
    when its body has ended (or failed: releasing closes the connection)."""
    try:
        while chunk := resp.raw.read_nowait():
            pass
    except (h1.H1Error, OSError):
        return True
    return chunk is not None


async def _read_rest(proxy: Proxy, resp: UpstreamResponse) -> None:
    """The rest of an upstream body after the end marker, read for at most
    ``drain_seconds`` so the connection can be reused, then released."""
    try:
        async with asyncio.timeout(proxy.config.server.drain_seconds):
            while await resp.read_chunk():
                pass
    except (UpstreamError, TimeoutError):
        pass
    finally:
        proxy.streams.discard(resp)
        resp.release()


async def _relay_gone(proxy: Proxy, call: Call, resp: UpstreamResponse, tap: Passthrough) -> None:
    proxy.watcher.unwatch()
    if tap.complete:
        return  # everything was sent; only the end of the response was lost
    call.status, call.http_status = "cancelled", 499
    limit = proxy.config.server.drain_seconds
    if limit <= 0:
        return
    try:
        async with asyncio.timeout(limit):
            while not tap.complete:
                chunk = await resp.read_chunk()
                if not chunk:
                    tap.close()
                    break
                tap.feed(chunk)
    except (UpstreamError, TimeoutError):
        pass


# ------------------------------------------------------------------ translated


async def emit_events(proxy: Proxy, call: Call, request: web.Request, ctx: EncodeContext,
                      source: UpstreamEvents | ProviderEvents) -> web.StreamResponse:
    """Drive IR events to the client, streamed or collected into one answer."""
    tracker = UsageTracker()
    try:
        if call.inbound is None or not call.inbound.stream:
            return await _collect(call, ctx, source, tracker)
        return await _stream_events(proxy, call, request, ctx, source, tracker)
    finally:
        call.usage, call.output_chars = tracker.usage, tracker.chars
        call.usage_complete = tracker.stop is not None
        await source.aclose()


async def _collect(call: Call, ctx: EncodeContext, source: Any, tracker: UsageTracker) -> web.Response:
    acc = ir.ResponseAccumulator()
    while (events := await source.next()) is not None:
        for ev in events:
            tracker.see(ev)
            try:
                acc.feed(ev)
            except Exception:  # noqa: BLE001 - an inconsistent event sequence from upstream
                raise UpstreamError("upstream_failed", "the upstream sent an inconsistent response", retryable=True) from None
    if acc.error is not None:
        # nothing reached the client yet, so another attempt cannot duplicate anything
        raise UpstreamError(acc.error.kind, acc.error.message, status=acc.error.status, retryable=True)
    answer = acc.response()
    answer.model = ctx.model
    return web.Response(body=call.protocol.encode_response(answer, ctx), content_type="application/json")


async def _stream_events(proxy: Proxy, call: Call, request: web.Request, ctx: EncodeContext, source: Any,
                         tracker: UsageTracker) -> web.StreamResponse:
    encoder = call.protocol.stream_encoder(ctx)
    run = getattr(encoder, "encode_text_run", None)
    decoder = getattr(source, "decoder", None)
    if run is not None and decoder is not None and hasattr(decoder, "text_runs"):
        decoder.text_runs = True  # text frames that come together go as one TextRun
    sink = Sink(call, request, _send_timeout(proxy))
    closed = False  # MessageStop went by: the encoder's end went out with its read
    try:
        finished = False
        while not finished and (events := await source.next()) is not None:
            # everything one upstream read produced goes out in one write
            # (a write costs more than encoding an event)
            parts: list[bytes] = []
            failed: ProxyError | None = None
            for ev in events:
                tracker.see(ev)
                if ev.type == "error":
                    if sink.out is None and not parts:
                        raise UpstreamError(ev.kind, ev.message, status=ev.status, retryable=True)  # type: ignore[union-attr]
                    failed = ProxyError(ev.kind, ev.message, status=ev.status)  # type: ignore[union-attr]
                    break
                data = run(ev) if ev.type == "text_run" else encoder.encode(ev)  # type: ignore[misc]
                if data:
                    parts.append(data)
            if tracker.stop is not None and failed is None:
                # the answer is whole (no event follows MessageStop): its end
                # (OpenAI's usage chunk and [DONE]) leaves in this write, and
                # the client's response ends now, whatever the upstream does
                # after its end marker (it may hold its body open)
                parts.append(encoder.close())
                closed = finished = True
            if parts:
                if sink.out is None:
                    await sink.start(encoder.content_type)
                    parts.insert(0, encoder.start())
                await sink.write(b"".join(parts))
            if failed is not None:
                await sink.fail(failed, encoder.error(failed))
                finished = True
        if closed:
            if isinstance(source, UpstreamEvents):
                source.rest_aside(proxy)
        elif not finished:
            if sink.out is None:
                await sink.start(encoder.content_type)
                await sink.write(encoder.start())
            await sink.finish(encoder.close())
    except asyncio.CancelledError:
        if sink.out is None:
            raise
        reason = absorb(call)
        if reason is None:
            raise
        if reason == SHUTDOWN:
            await sink.fail(shutdown_error(), encoder.error(shutdown_error()))
        else:
            await _events_gone(proxy, call, source, tracker)
    except ClientGone:
        await _events_gone(proxy, call, source, tracker)
    assert sink.out is not None
    return sink.out


async def _events_gone(proxy: Proxy, call: Call, source: Any, tracker: UsageTracker) -> None:
    proxy.watcher.unwatch()
    if tracker.stop is not None:
        return
    call.status, call.http_status = "cancelled", 499
    limit = proxy.config.server.drain_seconds
    if limit <= 0:
        return
    try:
        async with asyncio.timeout(limit):
            while tracker.stop is None and tracker.error is None:
                events = await source.next()
                if events is None:
                    break
                for ev in events:
                    tracker.see(ev)
    except TimeoutError:
        pass
