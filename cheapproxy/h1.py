"""A lean HTTP/1.1 client for the upstream hot path: one ``asyncio.Protocol``
per connection, ``httptools`` (llhttp) for parsing responses, a LIFO
keep-alive pool per origin, and no task, timer or URL object per request.

Only what ``UpstreamClient.send()`` needs: a request whose head is already
serialised (``H1Pool.head``), its body in one buffer, and a response read
chunk by chunk.  The caller passes deadlines (loop time) to the waits
(``H1Pool.request``, ``H1Response.read``); they are checked by one coarse
timer per pool (``Deadlines``), not a loop timer per wait.

* Responses framed by Content-Length, chunked, or by the connection closing;
  HTTP/1.0; 1xx answers skipped; ``Connection: close`` honoured.
* A body the caller does not read fast enough pauses the socket's reading
  above ``HIGH_WATER`` buffered bytes (a slow client pushes back on the
  upstream instead of growing memory).
* ``Content-Encoding: gzip`` / ``deflate`` is decoded (the request asks for no
  encoding, but an upstream may send one anyway); any other encoding is
  refused with ``ContentEncodingError``.
* An idle connection the server closed is never handed out; one closed by the
  server just as a request was written on it (EOF or reset before any byte of
  the answer) is retried once on a fresh connection.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
import zlib
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

HIGH_WATER = 256 * 1024  # unread body bytes that pause reading from the socket
MAX_HEAD = 64 * 1024  # response line + headers
MAX_DECODED_CHUNK = 1 << 20  # one inflated piece at most (a gzip bomb is read in bounded steps)
KEEPALIVE_SECONDS = 30.0  # an idle connection older than this is closed
_DIRECT_WRITE = 64 * 1024  # a body up to this is sent with its head in one write
DEADLINE_TICK = 0.02  # a wait's deadline fires at most this late (seconds)

# request fields the client owns: never taken from the caller's headers
_OWN_FIELDS = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "upgrade",
                         "expect", "proxy-connection", "trailer"})
_TARGET_OK = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*")
_LONE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ssl_context: ssl.SSLContext | None = None


class H1Error(Exception):
    """Any failure of the upstream transport."""


class ConnectError(H1Error):
    """TCP or TLS connect failed (refused, unreachable, DNS, certificate)."""


class ConnectTimeoutError(ConnectError):
    """The connect did not finish within the pool's connect timeout."""


class ServerDisconnectedError(H1Error):
    """The connection ended before the response was complete."""


class InvalidResponseError(H1Error):
    """The upstream sent something that is not an HTTP/1.x response."""


class ContentEncodingError(InvalidResponseError):
    """A Content-Encoding that cannot be decoded (unknown, or corrupt data)."""


def default_ssl_context() -> ssl.SSLContext:
    """One verifying client context for the process (making one costs ms)."""
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = ssl.create_default_context()
    return _ssl_context


def request_target(path: str, query: dict[str, str] | None = None) -> str:
    """``path`` (with any query it already has) made safe for a request line,
    plus ``query`` form-encoded."""
    if _TARGET_OK.fullmatch(path) is None or "%" in path and _LONE_PERCENT.search(path):
        path = quote(_LONE_PERCENT.sub("%25", path.replace("#", "%23")), safe="-._~!$&'()*+,;=:@/?%")
    if not path.startswith("/"):
        path = "/" + path
    if query:
        path += ("&" if "?" in path else "?") + urlencode(query)
    return path


def split_url(url: str) -> tuple[str, str]:
    """``("scheme://authority", "/path?query")`` without building a URL object."""
    start = url.find("://")
    cut = url.find("/", start + 3) if start > 0 else -1
    if cut < 0:
        return url, "/"
    return url[:cut], url[cut:]


class _Inflate:
    """gzip / deflate (zlib-wrapped or raw, guessed from the first bytes as
    browsers do), in bounded pieces."""

    __slots__ = ("gzip", "z")

    def __init__(self, gzip: bool) -> None:
        self.gzip = gzip
        self.z: Any = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None

    @property
    def tail(self) -> bytes:
        return self.z.unconsumed_tail if self.z is not None else b""

    def decompress(self, data: bytes) -> bytes:
        if self.z is None:
            wrapped = len(data) >= 2 and data[0] & 0x0F == 8 and int.from_bytes(data[:2], "big") % 31 == 0
            self.z = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        try:
            return self.z.decompress(data, MAX_DECODED_CHUNK)
        except zlib.error as exc:
            raise ContentEncodingError(f"corrupt {'gzip' if self.gzip else 'deflate'} body: {exc}") from None

    def flush(self) -> bytes:
        if self.z is None:
            return b""
        try:
            return self.z.flush()
        except zlib.error as exc:
            raise ContentEncodingError(f"corrupt compressed body: {exc}") from None


class Deadlines:
    """Deadlines of waiting futures, checked by one coarse timer: arming and
    cancelling a loop timer for every wait (what ``asyncio.timeout`` does)
    costs ~3-4 µs under uvloop, a dict entry ~0.1 µs.  A future still waiting
    at its deadline gets ``TimeoutError``, at most ``tick`` seconds late; the
    timer runs only while something waits."""

    __slots__ = ("loop", "tick", "waiting", "_handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float = DEADLINE_TICK) -> None:
        self.loop = loop
        self.tick = tick
        self.waiting: dict[asyncio.Future[Any], float] = {}
        self._handle: asyncio.TimerHandle | None = None

    def add(self, fut: asyncio.Future[Any], deadline: float) -> None:
        self.waiting[fut] = deadline
        if self._handle is None:
            self._handle = self.loop.call_later(self.tick, self._check)

    def discard(self, fut: asyncio.Future[Any]) -> None:
        self.waiting.pop(fut, None)

    def _check(self) -> None:
        self._handle = None
        now = self.loop.time()
        waiting = self.waiting
        for fut, deadline in list(waiting.items()):
            if deadline <= now:
                del waiting[fut]
                if not fut.done():
                    fut.set_exception(TimeoutError())
        if waiting:
            self._handle = self.loop.call_later(self.tick, self._check)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class H1Response:
    """One response.  The connection's callbacks fill it; the caller reads it
    with ``read()`` / ``read_nowait()`` and ends with ``release()`` (the
    connection goes back to the pool only when the whole message arrived) or
    ``close()``."""

    __slots__ = (
        "_decoder",
        "_done",
        "_headers",
        "_waiter",
        "chunks",
        "complete",
        "conn",
        "encoding",
        "error",
        "got_bytes",
        "headers_done",
        "informational",
        "raw_headers",
        "status",
        "version",
    )

    def __init__(self, conn: H1Connection) -> None:
        self.conn = conn
        self.status = 0
        self.version = "1.1"
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self._headers: CIMultiDictProxy[str] | None = None
        self.chunks: list[bytes] = []
        self.headers_done = False
        self.complete = False  # the whole message arrived (it may not all be read yet)
        self.error: BaseException | None = None
        self.got_bytes = False  # any byte of the answer arrived
        self.informational = False  # inside a 1xx answer
        self._waiter: asyncio.Future[None] | None = None
        self._done = False  # released or closed
        self._decoder: _Inflate | None = None
        self.encoding: bytes | None = None  # Content-Encoding, noted while parsing

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        h = self._headers
        if h is None:
            h = self._headers = CIMultiDictProxy(CIMultiDict(
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.raw_headers]))
        return h

    def header(self, name: bytes) -> bytes | None:
        """The last value of a header (``name`` lower-case), without building the mapping."""
        found = None
        n = len(name)
        for k, v in self.raw_headers:
            if len(k) == n and k.lower() == name:
                found = v
        return found

    # -- reading

    def read_nowait(self) -> bytes | None:
        """Buffered body bytes, b"" at the end, None when nothing is ready yet;
        raises the connection's failure once the buffered bytes are consumed."""
        if self._decoder is not None:
            return self._inflate_nowait()
        return self._raw_nowait()

    async def read(self, deadline: float | None = None) -> bytes:
        """The next body bytes; b"" at the end of the body.  TimeoutError when
        nothing came by ``deadline`` (loop time)."""
        while True:
            data = self.read_nowait()
            if data is not None:
                return data
            await self._wait(deadline)

    def _raw_nowait(self) -> bytes | None:
        chunks = self.chunks
        if chunks:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            conn = self.conn
            conn.buffered -= len(data)
            if conn.paused and conn.buffered < HIGH_WATER // 2:
                conn.resume()
            return data
        if self.complete:
            return b""
        if self.error is not None:
            raise self.error
        return None

    def _inflate_nowait(self) -> bytes | None:
        d = self._decoder
        assert d is not None
        while True:
            data = d.tail or self._raw_nowait()
            if data is None:
                return None
            if not data:  # end of the body
                self._decoder = None
                return d.flush()  # b"" (the end) when nothing was left; else the end comes next
            out = d.decompress(data)
            if out:
                return out

    async def _wait(self, deadline: float | None = None) -> None:
        pool = self.conn.pool
        self._waiter = fut = pool.loop.create_future()
        if deadline is None:
            try:
                await fut
            finally:
                self._waiter = None
            return
        if deadline <= pool.loop.time():
            self._waiter = None
            raise TimeoutError()
        deadlines = pool.deadlines()
        deadlines.add(fut, deadline)
        try:
            await fut
        finally:
            self._waiter = None
            deadlines.discard(fut)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait_head(self, deadline: float | None = None) -> None:
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self._wait(deadline)
        enc = self.encoding
        if enc is not None:
            value = enc.strip().lower()
            if value in (b"gzip", b"x-gzip", b"deflate"):
                self._decoder = _Inflate(value != b"deflate")
            elif value not in (b"", b"identity"):
                raise ContentEncodingError(f"unsupported Content-Encoding {enc.decode('latin-1')[:40]!r} "
                                           "(only gzip and deflate are decoded)")

    def close_delimited(self) -> bool:
        """The body ends when the connection closes (no length, not chunked)."""
        if self.status in (204, 304):
            return False
        te = self.header(b"transfer-encoding")
        return self.header(b"content-length") is None and (te is None or b"chunked" not in te.lower())

    # -- ending

    def release(self) -> None:
        """Done: the connection is reused when the whole message arrived, else closed."""
        if not self._done:
            self._done = True
            self.conn.pool._release(self.conn, self.complete and self.error is None)

    def close(self) -> None:
        """Close the connection now."""
        if not self._done:
            self._done = True
            self.conn.pool._release(self.conn, False)


class H1Connection(asyncio.Protocol):
    """One upstream connection: parser callbacks fill the current response."""

    def __init__(self, pool: H1Pool) -> None:
        self.pool = pool
        self.transport: Any = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: H1Response | None = None
        self.closed = False  # closing or closed: never handed out again
        self.keep_alive = False  # the last complete message allows reuse
        self.paused = False
        self.buffered = 0  # body bytes received and not yet read by the caller
        self.head_bytes = 0
        self.requests = 0
        self.idle_since = 0.0

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None or resp.complete:
            # bytes nobody asked for (a late 408, garbage): the connection cannot be trusted
            self.close()
            return
        resp.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(InvalidResponseError("the upstream switched protocols (HTTP 101), which is not supported"))
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, H1Error):
                self._fail(cause)
            else:
                self._fail(InvalidResponseError(f"invalid HTTP response: {exc}"))
            return
        if not resp.headers_done and not resp.complete:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD:
                self._fail(InvalidResponseError(f"response head larger than {MAX_HEAD} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._lost(self)
        resp = self.resp
        if resp is None or resp.complete or resp.error is not None:
            return
        if resp.headers_done and not resp.informational and resp.close_delimited():
            resp.complete = True  # the body was delimited by the connection closing
            self.keep_alive = False
        else:
            what = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
            state = "in the middle of the response" if resp.got_bytes else "before answering"
            resp.error = ServerDisconnectedError(f"the upstream closed the connection {state}{what}")
        resp._wake()

    def pause_writing(self) -> None:  # the whole request is buffered anyway
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        resp = self.resp
        if resp is None or resp.complete:
            raise InvalidResponseError("data after the end of the response")
        resp.raw_headers = []
        resp._headers = None
        resp.encoding = None

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self.resp
        assert resp is not None
        resp.raw_headers.append((name, value))
        if len(name) == 16 and name.lower() == b"content-encoding":
            resp.encoding = value

    def on_headers_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            resp.informational = True  # 100 Continue, 103 Early Hints: the real answer follows
            return
        resp.status = status
        resp.version = self.parser.get_http_version()
        resp.headers_done = True
        resp._wake()

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        assert resp is not None
        resp.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and not self.closed:
            self.paused = True
            self.transport.pause_reading()
        resp._wake()

    def on_message_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        if resp.informational:
            resp.informational = False
            self.head_bytes = 0
            return
        self.keep_alive = self.parser.should_keep_alive()
        resp.complete = True
        resp._wake()

    # -- ours

    def send(self, resp: H1Response, head: bytes, body: bytes) -> None:
        self.resp = resp
        self.requests += 1
        self.keep_alive = False  # until this answer is complete and allows it
        self.buffered = 0
        self.head_bytes = 0
        if len(body) <= _DIRECT_WRITE:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            self.transport.write(body)

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if not self.closed:
                self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            resp = self.resp
            if resp is not None and not resp.complete and resp.error is None:
                # a reader waiting now must not wait for connection_lost (a TLS close takes a while)
                resp.error = ServerDisconnectedError("the connection was closed before the response was complete")
                resp._wake()
            if self.transport is not None:
                self.transport.close()

    def _fail(self, err: H1Error) -> None:
        resp = self.resp
        if resp is not None and not resp.complete and resp.error is None:
            resp.error = err
            resp._wake()
        self.close()


class H1Pool:
    """Keep-alive connections to one origin (``scheme://host[:port]``)."""

    def __init__(self, origin: str, *, max_idle: int = 100, connect_timeout: float = 10.0,
                 keepalive: float = KEEPALIVE_SECONDS, ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConnectError(f"unsupported upstream URL {parts.scheme}://{parts.hostname or ''} (http or https only)")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = (ssl_context or default_ssl_context()) if parts.scheme == "https" else None
        netloc = parts.netloc.rpartition("@")[2]
        try:
            netloc.encode("ascii")
        except UnicodeEncodeError:
            netloc = netloc.encode("idna").decode("ascii")
        self.host_line = f"Host: {netloc}\r\n"
        self.auth_line = ""
        if parts.username is not None:  # user:password@ in base_url: HTTP Basic, as aiohttp did
            cred = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self.auth_line = f"Authorization: Basic {base64.b64encode(cred).decode('ascii')}\r\n"
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.idle: list[H1Connection] = []  # newest last (LIFO)
        self.conns: set[H1Connection] = set()  # every open connection
        self.in_use = 0  # connections lent to a request
        self.opened = 0  # connections ever made
        self.retried = 0  # requests retried after a reused connection was found closed
        self.closed = False
        self._sweeper: asyncio.TimerHandle | None = None
        self.loop: Any = None  # set by the first connect (connections belong to one loop)
        self._deadlines: Deadlines | None = None
        self._all_closed: asyncio.Future[None] | None = None

    # -- requests

    def head(self, method: str, target: str, fields: Iterable[tuple[str, str]], length: int) -> bytes:
        """The request head: our Host and Content-Length, then ``fields``
        (case-insensitively de-duplicated, the last wins; framing fields dropped)."""
        out: dict[str, str] = {}
        for name, value in fields:
            low = name.lower()
            if low not in _OWN_FIELDS:
                out[low] = f"{name}: {value}\r\n"
        auth = self.auth_line if self.auth_line and "authorization" not in out else ""
        return (f"{method} {target} HTTP/1.1\r\n{self.host_line}Content-Length: {length}\r\n{auth}"
                f"{''.join(out.values())}\r\n").encode()

    def deadlines(self) -> Deadlines:
        d = self._deadlines
        if d is None:
            d = self._deadlines = Deadlines(self.loop)
        return d

    async def request(self, head: bytes, body: bytes, deadline: float | None = None) -> H1Response:
        """Send, wait for the response head.  TimeoutError when the head has
        not come by ``deadline`` (loop time; it bounds the connect too)."""
        conn = self._take_idle()
        for attempt in (0, 1):
            if conn is None:
                conn = await self._connect(deadline)
            self.in_use += 1
            reused = conn.requests > 0
            resp = H1Response(conn)
            try:
                conn.send(resp, head, body)
                await resp._wait_head(deadline)
                return resp
            except ServerDisconnectedError:
                self._release(conn, False)
                if attempt or not reused or resp.got_bytes:
                    raise
                self.retried += 1  # the server closed the idle connection as we wrote: once more, fresh
                conn = None
            except BaseException:
                self._release(conn, False)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    # -- connections

    def _take_idle(self) -> H1Connection | None:
        idle = self.idle
        if not idle:
            return None
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            if conn.closed or conn.transport.is_closing() or now - conn.idle_since > self.keepalive:
                conn.close()
                continue
            return conn
        return None

    async def _connect(self, deadline: float | None = None) -> H1Connection:
        if self.closed:
            raise ConnectError("the upstream connection pool is closed")
        self.loop = loop = asyncio.get_running_loop()
        limit = loop.time() + self.connect_timeout
        caller_first = deadline is not None and deadline < limit
        try:
            async with asyncio.timeout_at(deadline if caller_first else limit):
                _, conn = await loop.create_connection(lambda: H1Connection(self), self.host, self.port, ssl=self.ssl,
                                                       server_hostname=self.host if self.ssl is not None else None)
        except TimeoutError:
            if caller_first:
                raise  # the caller's deadline (a plain TimeoutError), not connect_timeout
            raise ConnectTimeoutError(f"connecting to {self.host}:{self.port} took longer than "
                                      f"{self.connect_timeout:g}s") from None
        except ssl.SSLError as exc:
            raise ConnectError(f"TLS with {self.host}:{self.port} failed: {exc}") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        if self.closed:
            conn.close()
            raise ConnectError("the upstream connection pool is closed")
        self.conns.add(conn)
        self.opened += 1
        return conn

    def _release(self, conn: H1Connection, reusable: bool) -> None:
        self.in_use -= 1
        if not reusable or not conn.keep_alive or conn.closed or self.closed or len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.resp = None
        conn.resume()  # an idle connection must notice the server closing it
        conn.buffered = 0
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        if self._sweeper is None:
            self._schedule_sweep()

    def _lost(self, conn: H1Connection) -> None:
        self.conns.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        if self._all_closed is not None and not self.conns and not self._all_closed.done():
            self._all_closed.set_result(None)

    def _schedule_sweep(self) -> None:
        if self.idle and not self.closed:
            self._sweeper = asyncio.get_running_loop().call_at(self.idle[0].idle_since + self.keepalive, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle longer than ``keepalive`` (one timer per pool)."""
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        while self.idle and now - self.idle[0].idle_since >= self.keepalive:
            self.idle.pop(0).close()
        self._schedule_sweep()

    @property
    def idle_count(self) -> int:
        return len(self.idle)

    async def close(self, timeout: float = 1.0) -> None:
        """Close every connection, idle or in use (shutdown)."""
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._deadlines is not None:
            self._deadlines.close()
        self.idle.clear()
        if not self.conns:
            return
        self._all_closed = asyncio.get_running_loop().create_future()
        for conn in list(self.conns):
            conn.close()
        try:
            async with asyncio.timeout(timeout):
                await self._all_closed
        except TimeoutError:
            for conn in list(self.conns):
                if conn.transport is not None:
                    conn.transport.abort()


__all__ = [
    "HIGH_WATER",
    "KEEPALIVE_SECONDS",
    "MAX_HEAD",
    "ConnectError",
    "ConnectTimeoutError",
    "ContentEncodingError",
    "Deadlines",
    "H1Connection",
    "H1Error",
    "H1Pool",
    "H1Response",
    "InvalidResponseError",
    "ServerDisconnectedError",
    "default_ssl_context",
    "request_target",
    "split_url",
]
