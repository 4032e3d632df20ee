"""A scripted fault upstream for reliability tests: a real aiohttp server on
loopback that speaks the OpenAI Chat (``/v1/chat/completions``) and Anthropic
Messages (``/v1/messages``) wire formats, bytes written by hand.

Each request gets the next :class:`Fault` of the script (``script(...)``),
else the one named by a ``[fault:NAME]`` tag in the request text (``presets``),
else ``default``.  Every request is logged with a timestamp before it is
answered, so tests can count attempts per upstream and see their order; a log
entry also says whether the peer (the gateway) closed the connection before
the answer was complete (``peer_closed``), which is how a test proves the
gateway cancelled an upstream request.

Fault kinds:

* ``ok``: the answer (``chunks`` text deltas ``t0 `` ``t1 `` ...), streamed or not;
  ``delay`` between deltas makes it a slow stream; ``gate`` (an asyncio.Event)
  holds the stream after ``hold_after`` deltas until it is set;
* ``status``: an error of ``status`` in the protocol's shape (``retry_after``
  header; ``echo_key`` quotes the credential it received, as careless APIs do);
* ``stall_headers``: response headers, then silence;
* ``stall_accept``: no response headers at all, silence;
* ``stall_mid``: ``chunks`` deltas, then silence;
* ``cut``: ``chunks`` deltas, then a clean end of the HTTP body without the
  protocol's end marker;
* ``fin``: ``chunks`` deltas, then the TCP connection is closed mid-body (FIN);
* ``rst``: ``chunks`` deltas, then a TCP reset (SO_LINGER 0 + abort);
* ``redirect``: a 307 to ``location`` (a gateway must not follow it);
* ``linger``: the whole answer, end marker included, then the HTTP body is
  held open (``trailer`` bytes written 50 ms after the marker, or with it when
  ``trailer_with_end``, if any) until the
  peer goes away, the ``gate`` opens or the upstream is released.

Silences end when the peer goes away or on :meth:`FaultUpstream.release`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections import deque
from typing import Any

import attrs
from aiohttp import web

SECRET = "upstream-secret"
MODEL_CREATED = 1700000000
INPUT_TOKENS = 11


@attrs.define(kw_only=True)
class Fault:
    """One scripted answer."""

    kind: str = "ok"
    chunks: int = 3
    delay: float = 0.0
    status: int = 500
    retry_after: str | None = None
    echo_key: bool = False
    gate: asyncio.Event | None = None
    hold_after: int = 1
    piece_size: int = 0  # >0: every delta is this many 'x' (bulk streams)
    location: str = ""  # redirect target
    trailer: bytes = b""  # linger: written after the end marker
    trailer_with_end: bool = False  # the trailer goes in the end marker's write (else 50 ms later)

    def pieces(self) -> list[str]:
        if self.piece_size:
            return ["x" * self.piece_size] * self.chunks
        return [f"t{i} " for i in range(self.chunks)]

    def text(self, upto: int | None = None) -> str:
        return "".join(self.pieces()[:upto])


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# ---------------------------------------------------------------- wire formats


class _OpenAI:
    name = "openai-chat"

    @staticmethod
    def credential(request: web.Request) -> str:
        return request.headers.get("Authorization", "").removeprefix("Bearer ")

    @staticmethod
    def error(status: int, message: str) -> bytes:
        etype = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_denied",
                 429: "rate_limit_exceeded"}.get(status, "server_error")
        return _dumps({"error": {"message": message, "type": etype, "param": None, "code": None}})

    @staticmethod
    def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
        obj = {"id": "chatcmpl-fault", "object": "chat.completion.chunk", "created": MODEL_CREATED, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + _dumps(obj) + b"\n\n"

    @classmethod
    def head(cls, body: dict[str, Any]) -> list[bytes]:
        return [cls._chunk(body.get("model", "?"), {"role": "assistant", "content": ""})]

    @classmethod
    def delta(cls, body: dict[str, Any], text: str) -> bytes:
        return cls._chunk(body.get("model", "?"), {"content": text})

    @classmethod
    def tail(cls, body: dict[str, Any], n: int) -> list[bytes]:
        out = [cls._chunk(body.get("model", "?"), {}, "stop")]
        so = body.get("stream_options")
        if isinstance(so, dict) and so.get("include_usage"):
            obj = {"id": "chatcmpl-fault", "object": "chat.completion.chunk", "created": MODEL_CREATED,
                   "model": body.get("model", "?"), "choices": [], "usage": cls.usage(n)}
            out.append(b"data: " + _dumps(obj) + b"\n\n")
        out.append(b"data: [DONE]\n\n")
        return out

    @staticmethod
    def usage(n: int) -> dict[str, Any]:
        return {"prompt_tokens": INPUT_TOKENS, "completion_tokens": n, "total_tokens": INPUT_TOKENS + n}

    @classmethod
    def whole(cls, body: dict[str, Any], text: str, n: int) -> bytes:
        return _dumps({"id": "chatcmpl-fault", "object": "chat.completion", "created": MODEL_CREATED,
                       "model": body.get("model", "?"),
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                       "usage": cls.usage(n)})


class _Anthropic:
    name = "anthropic-messages"

    @staticmethod
    def credential(request: web.Request) -> str:
        return request.headers.get("x-api-key", "")

    @staticmethod
    def error(status: int, message: str) -> bytes:
        etype = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")
        return _dumps({"type": "error", "error": {"type": etype, "message": message}})

    @staticmethod
    def _ev(name: str, data: dict[str, Any]) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + _dumps(data) + b"\n\n"

    @classmethod
    def head(cls, body: dict[str, Any]) -> list[bytes]:
        msg = {"id": "msg_fault", "type": "message", "role": "assistant", "model": body.get("model", "?"), "content": [],
               "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": 1}}
        return [cls._ev("message_start", {"type": "message_start", "message": msg}),
                cls._ev("content_block_start", {"type": "content_block_start", "index": 0,
                                                "content_block": {"type": "text", "text": ""}})]

    @classmethod
    def delta(cls, body: dict[str, Any], text: str) -> bytes:
        return cls._ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": text}})

    @classmethod
    def tail(cls, body: dict[str, Any], n: int) -> list[bytes]:
        return [cls._ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
                cls._ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                          "usage": {"output_tokens": n}}),
                cls._ev("message_stop", {"type": "message_stop"})]

    @classmethod
    def whole(cls, body: dict[str, Any], text: str, n: int) -> bytes:
        return _dumps({"id": "msg_fault", "type": "message", "role": "assistant", "model": body.get("model", "?"),
                       "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                       "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": n}})


def _last_text(body: Any) -> str:
    try:
        content = body["messages"][-1]["content"]
    except (KeyError, IndexError, TypeError):
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class FaultUpstream:
    """The server.  ``await FaultUpstream().start()``; ``base_url(protocol)``
    gives what goes into ``[[upstreams]] base_url``."""

    def __init__(self, *, secret: str = SECRET, default: Fault | None = None,
                 presets: dict[str, Fault] | None = None, keepalive_timeout: float = 75.0,
                 log_limit: int | None = None) -> None:
        self.secret = secret
        self.log_limit = log_limit  # keep only the newest entries (soak tests)
        self.requests = 0  # every request, also those dropped from a limited log
        self.keepalive_timeout = keepalive_timeout
        self.default = default or Fault()
        self.presets = dict(presets or {})
        self.queue: deque[Fault] = deque()
        self.log: list[dict[str, Any]] = []
        self.written = 0  # body bytes written by all answers
        self.active = 0  # answers in progress
        self._released = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.root = ""

    # ---- control

    def script(self, *faults: Fault) -> FaultUpstream:
        self.queue.extend(faults)
        return self

    def release(self) -> None:
        """End every silence now (and every gate)."""
        self._released.set()

    @property
    def connections(self) -> int:
        """Open connections from clients (the gateway's pool included)."""
        server = self._runner.server if self._runner is not None else None
        return len(server.connections) if server is not None else 0

    def attempts(self, path: str | None = None) -> int:
        return sum(1 for e in self.log if path is None or e["path"] == path)

    def base_url(self, protocol: str) -> str:
        return self.root + "/v1" if protocol == "openai-chat" else self.root

    def toml(self, name: str, protocol: str, **extra: Any) -> str:
        provider = "openai" if protocol == "openai-chat" else "anthropic"
        lines = ["[[upstreams]]", f'name = "{name}"', f'provider = "{provider}"',
                 f'base_url = "{self.base_url(protocol)}"', f'api_key = "{self.secret}"']
        lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
        return "\n".join(lines) + "\n"

    async def start(self, port: int = 0) -> FaultUpstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handler(_OpenAI))
        app.router.add_post("/v1/messages", self._handler(_Anthropic))
        app.router.add_post("/v1/messages/count_tokens", self._handler(_Anthropic))
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5,
                                     keepalive_timeout=self.keepalive_timeout)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        host, bound = self._runner.addresses[0][:2]
        self.root = f"http://{host}:{bound}"
        return self

    async def close(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- serving

    def _pick(self, body: Any) -> Fault:
        text = _last_text(body)
        for name, fault in self.presets.items():
            if f"[fault:{name}]" in text:
                return fault
        if self.queue:
            return self.queue.popleft()
        return self.default

    def _handler(self, wire: Any) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            raw = await request.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            fault = self._pick(body)
            entry = {"t": asyncio.get_running_loop().time(), "protocol": wire.name, "method": request.method,
                     "path": request.path, "query": dict(request.query),
                     "headers": {k.lower(): v for k, v in request.headers.items()}, "body": body,
                     "fault": fault.kind, "peer_closed": False, "finished": False}
            self.log.append(entry)
            self.requests += 1
            if self.log_limit is not None and len(self.log) > self.log_limit:
                del self.log[: len(self.log) - self.log_limit]
            self.active += 1
            try:
                return await self._answer(request, wire, body if isinstance(body, dict) else {}, fault, entry)
            except (ConnectionError, RuntimeError):
                entry["peer_closed"] = True
                return web.Response(status=499)
            finally:
                self.active -= 1

        return handle

    async def _silence(self, request: web.Request, entry: dict[str, Any], gate: asyncio.Event | None = None) -> None:
        """Wait until released (or the gate opens); notice the peer leaving."""
        while not self._released.is_set() and not (gate is not None and gate.is_set()):
            transport = request.transport
            if transport is None or transport.is_closing():
                entry["peer_closed"] = True
                raise ConnectionResetError("peer closed")
            await asyncio.sleep(0.01)

    async def _answer(self, request: web.Request, wire: Any, body: dict[str, Any], fault: Fault,
                      entry: dict[str, Any]) -> web.StreamResponse:
        got = wire.credential(request)
        if got != self.secret:
            return web.Response(status=401, body=wire.error(401, "invalid credential"), content_type="application/json")
        if fault.kind == "status":
            msg = f"scripted error {fault.status}"
            if fault.echo_key:
                msg += f" (credential used: {got}; header: {request.headers.get('Authorization') or got})"
            headers = {"retry-after": fault.retry_after} if fault.retry_after is not None else None
            return web.Response(status=fault.status, body=wire.error(fault.status, msg), content_type="application/json",
                                headers=headers)
        if fault.kind == "redirect":
            return web.Response(status=307, headers={"Location": fault.location})
        if fault.kind == "stall_accept":
            await self._silence(request, entry)
            return web.Response(status=503)
        if request.path.endswith("/count_tokens") and fault.kind == "ok":
            entry["finished"] = True
            return web.Response(body=_dumps({"input_tokens": INPUT_TOKENS}), content_type="application/json")
        stream = body.get("stream") is True
        pieces = fault.pieces()
        if not stream:
            return await self._whole(request, wire, body, fault, entry, pieces)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        if fault.kind == "stall_headers":
            await self._silence(request, entry)
            return resp
        for frame in wire.head(body):
            await self._write(resp, frame)
        for i, piece in enumerate(pieces):
            if fault.gate is not None and i == fault.hold_after:
                await self._silence(request, entry, fault.gate)
            await self._write(resp, wire.delta(body, piece))
            if fault.delay:
                await asyncio.sleep(fault.delay)
        if fault.kind in ("ok", "linger"):
            tail = list(wire.tail(body, len(pieces)))
            if fault.kind == "linger" and fault.trailer and fault.trailer_with_end:
                tail[-1] += fault.trailer  # one write: the marker and the trailer in one read
            for frame in tail:
                await self._write(resp, frame)
            if fault.kind == "linger":
                if fault.trailer and not fault.trailer_with_end:
                    await asyncio.sleep(0.05)  # a read of its own
                    await self._write(resp, fault.trailer)
                await self._silence(request, entry, fault.gate)
            await resp.write_eof()
            entry["finished"] = True
            return resp
        await self._fault_end(request, resp, fault, entry)
        return resp

    async def _whole(self, request: web.Request, wire: Any, body: dict[str, Any], fault: Fault, entry: dict[str, Any],
                     pieces: list[str]) -> web.StreamResponse:
        data = wire.whole(body, "".join(pieces), len(pieces))
        if fault.kind == "ok":
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.gate is not None:
                await self._silence(request, entry, fault.gate)
            entry["finished"] = True
            return web.Response(body=data, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        if fault.kind == "stall_headers":
            await self._silence(request, entry)
            return resp
        await self._write(resp, data[: len(data) // 2])
        await self._fault_end(request, resp, fault, entry)
        return resp

    async def _write(self, resp: web.StreamResponse, data: bytes) -> None:
        await resp.write(data)
        self.written += len(data)

    async def _fault_end(self, request: web.Request, resp: web.StreamResponse, fault: Fault, entry: dict[str, Any]) -> None:
        if fault.kind == "stall_mid":
            await self._silence(request, entry)
        elif fault.kind == "cut":
            await resp.write_eof()
        elif fault.kind in ("fin", "rst"):
            transport = request.transport
            if transport is None:
                return
            # let what was written reach the socket first
            while transport.get_write_buffer_size():
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.02)
            if fault.kind == "rst":
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
            else:
                transport.close()
        else:
            raise ValueError(f"unknown fault kind {fault.kind!r}")


__all__ = ["Fault", "FaultUpstream", "SECRET", "INPUT_TOKENS"]
