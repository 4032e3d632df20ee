"""The upstream HTTP/1.1 client (cheapproxy/h1.py) and UpstreamClient.send()
on top of it, against real loopback servers: aiohttp test servers and raw
asyncio servers that misbehave on purpose (scripted bytes, stalls, early
closes, garbage), plus a parser-level test that cuts responses at every byte
boundary."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import ssl
import zlib
from typing import Any, Self

import pytest
from aiohttp import web

from cheapproxy import h1
from cheapproxy.catalog import Upstream
from cheapproxy.config import UpstreamConfig
from cheapproxy.errors import UpstreamError
from cheapproxy.protocol import UpstreamRequest
from cheapproxy.provider import ProviderType
from cheapproxy.upstream import Breaker, UpstreamClient

from .reliability_util import Blackhole, eventually

SECRET = "sk-h1-test-secret"


# ---------------------------------------------------------------- helpers


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """One request (head, body) from a client; None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


class Raw:
    """A loopback server running ``serve(server, reader, writer, n)`` for its
    n-th connection; it logs every request it reads through ``next()``."""

    def __init__(self, serve: Any) -> None:
        self.serve = serve
        self.accepted = 0
        self.requests: list[tuple[int, bytes, bytes]] = []  # (connection number, head, body)
        self.peer_closed: list[int] = []  # connections the client closed (EOF seen by next())
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._on, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def next(self, reader: asyncio.StreamReader, n: int) -> bool:
        got = await read_request(reader)
        if got is None:
            self.peer_closed.append(n)
            return False
        self.requests.append((n, *got))
        return True

    async def _on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            await self.serve(self, reader, writer, self.accepted)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def ok(body: bytes = b"hello", *extra: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in extra)
    return f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


def chunked(*pieces: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n")


def keepalive(*answers: bytes) -> Any:
    """Answer each request on a connection with the next of ``answers`` (the last repeats)."""
    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        i = 0
        while await srv.next(reader, n):
            writer.write(answers[min(i, len(answers) - 1)])
            await writer.drain()
            i += 1
    return serve


async def fetch(pool: h1.H1Pool, body: bytes = b"{}", target: str = "/x") -> tuple[h1.H1Response, bytes]:
    async with asyncio.timeout(10):  # a regression fails, never hangs
        resp = await pool.request(pool.head("POST", target, [("Content-Type", "application/json")], len(body)), body)
        data = b""
        while chunk := await resp.read():
            data += chunk
    resp.release()
    return resp, data


@pytest.fixture
async def pools():
    made: list[h1.H1Pool] = []

    def make(url: str, **kw: Any) -> h1.H1Pool:
        made.append(h1.H1Pool(url, **kw))
        return made[-1]

    yield make
    for p in made:
        await p.close()


class _Provider(ProviderType):
    name = "h1-test"

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.upstream.api_key}"}


@pytest.fixture
async def client_for():
    made: list[UpstreamClient] = []

    def make(url: str, **cfg: Any) -> UpstreamClient:
        uc = UpstreamConfig(name="up", provider="h1-test", base_url=url, api_key=SECRET, **cfg)
        made.append(UpstreamClient(Upstream(config=uc, provider=_Provider(uc, None), protocol=None), Breaker(5, 1.0, 10.0)))
        return made[-1]

    yield make
    for c in made:
        await c.close()


def ureq(path: str = "/v1/chat/completions", **kw: Any) -> UpstreamRequest:
    return UpstreamRequest(path=path, body=b'{"model":"m"}', **kw)


def assert_clean(client: UpstreamClient) -> None:
    assert client.busy == 0 and client.connections_in_use == 0


# ---------------------------------------------------------------- keep-alive pooling


async def test_sequential_requests_reuse_one_connection(aiohttp_server, pools):
    peers = []

    async def handler(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername"))
        return web.json_response({"n": len(peers), "echo": (await request.read()).decode()})

    app = web.Application()
    app.router.add_post("/x", handler)
    server = await aiohttp_server(app)
    pool = pools(str(server.make_url("/")).rstrip("/"))
    for i in range(5):
        resp, data = await fetch(pool, b'{"i": %d}' % i)
        assert resp.status == 200 and resp.headers["content-type"].startswith("application/json")
        assert data == b'{"n": %d, "echo": "{\\"i\\": %d}"}' % (i + 1, i)
    assert len(set(peers)) == 1 and pool.opened == 1 and pool.in_use == 0 and pool.idle_count == 1


async def test_idle_connections_are_lifo_and_capped(pools):
    gate = asyncio.Event()

    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        while await srv.next(reader, n):
            await gate.wait()
            writer.write(ok(b"%d" % n))
            await writer.drain()

    async with Raw(serve) as srv:
        pool = pools(srv.url, max_idle=2)
        tasks = [asyncio.create_task(fetch(pool)) for _ in range(3)]
        await eventually(lambda: len(srv.requests) == 3)
        assert pool.in_use == 3
        gate.set()
        await asyncio.gather(*tasks)
        assert pool.in_use == 0 and pool.idle_count == 2  # at most max_idle kept
        newest = pool.idle[-1]
        resp, _ = await fetch(pool)
        assert resp.conn is newest and pool.opened == 3


async def test_idle_connection_closed_by_the_server_is_not_handed_out(pools):
    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        if await srv.next(reader, n):
            writer.write(ok(b"one"))  # keep-alive answer, then the server closes the idle connection
            await writer.drain()

    async with Raw(serve) as srv:
        pool = pools(srv.url)
        _, data = await fetch(pool)
        assert data == b"one" and pool.idle_count == 1
        await eventually(lambda: pool.idle_count == 0)  # noticed the close while idle, dropped it
        _, data = await fetch(pool)
        assert data == b"one" and srv.accepted == 2 and pool.retried == 0


async def test_idle_connection_being_closed_is_not_handed_out(pools):
    async with Raw(keepalive(ok())) as srv:
        pool = pools(srv.url)
        await fetch(pool)
        pool.idle[-1].transport.close()  # closing; connection_lost not delivered yet
        assert pool.idle_count == 1
        await fetch(pool)
        assert srv.accepted == 2 and pool.retried == 0


async def test_an_unfinished_body_is_never_reused(pools):
    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        while await srv.next(reader, n):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
            await writer.drain()

    async with Raw(serve) as srv:
        pool = pools(srv.url)
        for _ in range(2):
            resp = await pool.request(pool.head("POST", "/x", [], 0), b"")
            assert await resp.read() == b"01234"
            resp.release()  # the rest never came: closed, not pooled
            assert pool.idle_count == 0 and pool.in_use == 0
        assert srv.accepted == 2
        await eventually(lambda: srv.peer_closed == [1, 2])


async def test_reused_connection_closed_as_the_request_is_written_is_retried_once(pools):
    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        if not await srv.next(reader, n):
            return
        writer.write(ok(b"first %d" % n))
        await writer.drain()
        if n == 1:
            await srv.next(reader, n)  # the race: the request arrives as the server gives up on the connection
            return  # closed without a byte of answer

    async with Raw(serve) as srv:
        pool = pools(srv.url)
        await fetch(pool)
        _, data = await fetch(pool)
        assert data == b"first 2" and pool.retried == 1 and srv.accepted == 2 and len(srv.requests) == 3
        assert pool.in_use == 0


async def test_a_fresh_connection_closed_before_answering_is_not_retried(pools):
    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        await srv.next(reader, n)

    async with Raw(serve) as srv:
        pool = pools(srv.url)
        with pytest.raises(h1.ServerDisconnectedError, match="before answering"):
            await fetch(pool)
        assert srv.accepted == 1 and pool.retried == 0 and pool.in_use == 0


async def test_a_reset_after_part_of_the_answer_is_not_retried(pools):
    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        while await srv.next(reader, n):
            if len(srv.requests) == 1:
                writer.write(ok(b"fine"))
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")  # a piece of a head, then gone
                await writer.drain()
                writer.transport.abort()
                return

    async with Raw(serve) as srv:
        pool = pools(srv.url)
        await fetch(pool)
        with pytest.raises(h1.ServerDisconnectedError, match="in the middle"):
            await fetch(pool)
        assert pool.retried == 0 and len(srv.requests) == 2


async def test_idle_connections_expire(pools):
    async with Raw(keepalive(ok())) as srv:
        pool = pools(srv.url, keepalive=0.2)
        await fetch(pool)
        assert pool.idle_count == 1 and len(pool.conns) == 1
        await eventually(lambda: not pool.conns)  # the pool's one timer closed it
        assert srv.peer_closed == [1]
        await fetch(pool)
        assert srv.accepted == 2


async def test_closing_a_response_wakes_its_reader_at_once(pools):
    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        if await srv.next(reader, n):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await writer.drain()
            await srv.next(reader, n)

    async with Raw(serve) as srv:
        pool = pools(srv.url)
        resp = await pool.request(pool.head("POST", "/x", [], 0), b"")
        reading = asyncio.create_task(resp.read())
        await asyncio.sleep(0.01)
        resp.close()  # e.g. shutdown ending a stream while its relay waits on the upstream
        await asyncio.sleep(0)
        assert reading.done()
        with pytest.raises(h1.ServerDisconnectedError):
            reading.result()
        assert pool.in_use == 0
        await eventually(lambda: srv.peer_closed == [1])


async def test_close_closes_every_connection_and_fails_the_one_in_use(pools):
    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        while await srv.next(reader, n):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
            await writer.drain()

    async with Raw(serve) as srv:
        pool = pools(srv.url)
        resp = await pool.request(pool.head("POST", "/x", [], 0), b"")
        assert await resp.read() == b"part"
        await pool.close()
        assert not pool.conns
        with pytest.raises(h1.ServerDisconnectedError):
            await resp.read()
        resp.release()
        assert pool.in_use == 0
        with pytest.raises(h1.ConnectError, match="closed"):
            await fetch(pool)


# ---------------------------------------------------------------- framing


@pytest.mark.parametrize("answer,body", [
    (ok(b"x" * 70_000), b"x" * 70_000),
    (chunked(b"ab", b"c" * 5000, b"d"), b"ab" + b"c" * 5000 + b"d"),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ok(b"after 1xx"), b"after 1xx"),
], ids=["content-length", "chunked", "1xx-skipped"])
async def test_bodies_written_in_awkward_pieces(pools, answer, body):
    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        sizes = [1, 2, 3, 5, 7, 11, 13, 4096]
        while await srv.next(reader, n):
            i = k = 0
            while i < len(answer):
                step = sizes[k % len(sizes)]
                writer.write(answer[i:i + step])
                await writer.drain()
                await asyncio.sleep(0)
                i, k = i + step, k + 1

    async with Raw(serve) as srv:
        pool = pools(srv.url)
        for _ in range(2):
            resp, data = await fetch(pool)
            assert resp.status == 200 and data == body
        assert pool.opened == 1  # both framings allow reuse
        if b"Early" in answer:
            assert "Link" not in resp.headers  # the 1xx headers are not the answer's


def _feed_split(wire: bytes, cuts: tuple[int, ...], *, eof: bool = False) -> h1.H1Response:
    """Parse ``wire`` delivered in pieces cut at ``cuts`` (no network)."""

    class Transport(asyncio.Transport):
        def write(self, data: Any) -> None:
            pass

        def is_closing(self) -> bool:
            return False

        def close(self) -> None:
            pass

    pool = h1.H1Pool("http://upstream.invalid")
    conn = h1.H1Connection(pool)
    conn.connection_made(Transport())
    resp = h1.H1Response(conn)
    conn.send(resp, b"", b"")
    edges = [0, *cuts, len(wire)]
    for a, b in itertools.pairwise(edges):
        if a < b:
            conn.data_received(wire[a:b])
    if eof:
        conn.connection_lost(None)
    return resp


def test_parser_at_every_byte_boundary():
    """Every cut into two and three pieces, for each framing."""
    cases = [
        (chunked(b"data: 1\n\n", b"x", b"data: [DONE]\n\n"), b"data: 1\n\nxdata: [DONE]\n\n", False),
        (ok(b"0123456789abcdef"), b"0123456789abcdef", False),
        (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", b"until the end", True),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + chunked(b"ok"), b"ok", False),
    ]
    for wire, body, eof in cases:
        n = len(wire)
        splits = [(i,) for i in range(1, n)] + [(i, j) for i in range(1, n, 3) for j in range(i + 1, n, 2)]
        for cuts in splits:
            resp = _feed_split(wire, cuts, eof=eof)
            assert resp.complete and resp.error is None, (wire, cuts)
            assert resp.status == 200 and b"".join(resp.chunks) == body, (wire, cuts)


def test_parser_truncated_bodies_are_errors_not_ends():
    for wire in (ok(b"0123456789")[:-3], chunked(b"abc", b"def")[:-5]):
        resp = _feed_split(wire, (), eof=True)
        assert not resp.complete and isinstance(resp.error, h1.ServerDisconnectedError)


async def test_close_delimited_and_http10_bodies(pools):
    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        if await srv.next(reader, n):
            version = b"1.0" if n == 1 else b"1.1"
            writer.write(b"HTTP/" + version + b" 200 OK\r\nContent-Type: text/plain\r\n\r\nbody until close %d" % n)
            await writer.drain()

    async with Raw(serve) as srv:
        pool = pools(srv.url)
        for n in (1, 2):
            resp, data = await fetch(pool)
            assert data == b"body until close %d" % n and resp.version == ("1.0" if n == 1 else "1.1")
        assert pool.opened == 2 and pool.idle_count == 0


async def test_http10_keep_alive_and_connection_close_are_honoured(pools):
    answers = [ok(b"a", "Connection: close"), b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nb",
               b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive\r\n\r\nc", ok(b"d")]

    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        while await srv.next(reader, n):
            writer.write(answers[len(srv.requests) - 1])
            await writer.drain()

    async with Raw(serve) as srv:
        pool = pools(srv.url)
        got = [(await fetch(pool))[1] for _ in range(4)]
        assert got == [b"a", b"b", b"c", b"d"]
        # close -> new; HTTP/1.0 without keep-alive -> new; HTTP/1.0 keep-alive -> reused for "d"
        assert [n for n, _, _ in srv.requests] == [1, 2, 3, 3]
        assert pool.retried == 0


@pytest.mark.parametrize("garbage", [b"SMTP ready\r\n\r\n", b"HTTP/1.1 2000 Huh\r\n\r\n",
                                     b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
                                     b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                                     b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000],
                         ids=["not-http", "bad-status", "bad-length", "two-lengths", "huge-head"])
async def test_invalid_http_is_an_error(pools, garbage):
    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        if await srv.next(reader, n):
            writer.write(garbage)
            await writer.drain()
            await reader.read()  # keep the connection open: the client must give up on its own

    async with Raw(serve) as srv:
        pool = pools(srv.url)
        with pytest.raises(h1.InvalidResponseError):
            async with asyncio.timeout(5):
                await fetch(pool)
        assert pool.in_use == 0
        await eventually(lambda: not pool.conns)


async def test_bytes_after_the_response_close_the_connection(pools):
    async with Raw(keepalive(ok(b"one") + b"HTTP/1.1 200 OK\r\n")) as srv:
        pool = pools(srv.url)
        _, data = await fetch(pool)
        assert data == b"one"  # the answer itself is fine
        await eventually(lambda: not pool.conns)  # but the connection is not trusted again
        await fetch(pool)
        assert srv.accepted == 2


# ---------------------------------------------------------------- flow control


async def test_a_slow_reader_pauses_the_socket(pools):
    size = 8 * 2**20
    written = []

    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        if await srv.next(reader, n):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            sent = 0
            while sent < size:
                writer.write(b"z" * 65536)
                await writer.drain()
                sent += 65536
                written.append(sent)
            await reader.read()

    async with Raw(serve) as srv:
        pool = pools(srv.url)
        resp = await pool.request(pool.head("POST", "/x", [], 0), b"")
        conn = resp.conn
        got = peak = 0
        paused = False
        while True:
            await asyncio.sleep(0.01)  # a slow client
            peak = max(peak, conn.buffered)
            paused = paused or conn.paused
            chunk = await resp.read()
            if not chunk:
                break
            got += len(chunk)
        resp.release()
        assert got == size and paused
        # never more than the limit plus one socket read (256 KiB) buffered in the client
        assert peak <= h1.HIGH_WATER + 256 * 1024, peak
        assert pool.idle_count == 1 and not conn.paused  # reused, reading again


async def test_a_slow_reader_pushes_back_on_the_server(pools):
    """While the client does not read, the server cannot write the whole body."""
    size = 64 * 2**20
    progress = [0]

    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        if await srv.next(reader, n):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            while progress[0] < size:
                writer.write(b"z" * 65536)
                await writer.drain()
                progress[0] += 65536

    async with Raw(serve) as srv:
        pool = pools(srv.url)
        resp = await pool.request(pool.head("POST", "/x", [], 0), b"")
        await asyncio.sleep(0.5)  # not reading
        assert resp.conn.paused and resp.conn.buffered <= h1.HIGH_WATER + 256 * 1024
        assert progress[0] < size // 2  # held back by TCP, not buffered in the client
        resp.close()


# ---------------------------------------------------------------- content encodings


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate"])
async def test_compressed_bodies_are_decoded(pools, encoding):
    body = b'{"choices": [{"text": "' + b"compressible " * 20000 + b'"}]}'
    if encoding == "gzip":
        data, name = gzip.compress(body), "gzip"
    elif encoding == "deflate":
        data, name = zlib.compress(body), "deflate"
    else:
        c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        data, name = c.compress(body) + c.flush(), "deflate"
    answer = (b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % name.encode()
              + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (data[:10], data[10:100], data[100:])) + b"0\r\n\r\n")
    async with Raw(keepalive(answer)) as srv:
        pool = pools(srv.url)
        resp, got = await fetch(pool)
        assert got == body and resp.headers["Content-Encoding"] == name
        assert pool.idle_count == 1


async def test_gzip_from_an_aiohttp_server(aiohttp_server, client_for):
    async def handler(request: web.Request) -> web.Response:
        resp = web.json_response({"ok": True, "pad": "p" * 5000})
        resp.enable_compression(web.ContentCoding.gzip)
        return resp

    app = web.Application()
    app.router.add_post("/v1/x", handler)
    server = await aiohttp_server(app)
    client = client_for(str(server.make_url("/v1")))
    resp = await client.send(ureq("/x"))
    assert resp.headers["Content-Encoding"] == "gzip"
    assert (await resp.read_all()).startswith(b'{"ok": true')
    resp.release()
    assert_clean(client)


async def test_unknown_or_corrupt_encodings_are_refused(client_for):
    answers = [b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 3\r\n\r\nabc",
               b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\n\r\nnot gzip!"]

    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        while await srv.next(reader, n):
            writer.write(answers[len(srv.requests) - 1])
            await writer.drain()

    async with Raw(serve) as srv:
        client = client_for(srv.url)
        with pytest.raises(UpstreamError) as e:
            await client.send(ureq())
        assert e.value.kind == "upstream_failed" and e.value.retryable and "'br'" in e.value.message
        resp = await client.send(ureq())
        with pytest.raises(UpstreamError) as e:
            await resp.read_all()
        assert e.value.kind == "upstream_failed" and "ContentEncodingError" in e.value.message
        resp.release()
        assert_clean(client)


# ---------------------------------------------------------------- UpstreamClient.send


async def test_request_head_is_what_send_builds(client_for):
    async with Raw(keepalive(ok(b"{}"))) as srv:
        client = client_for(srv.url + "/v1beta")
        client.upstream.provider.auth_query = lambda: {"key": SECRET}  # type: ignore[method-assign]
        req = ureq("/models/a b:generateContent", query={"alt": "sse"},
                   headers={"content-type": "application/json; charset=utf-8", "anthropic-beta": "x",
                            "Host": "evil.example", "Content-Length": "1", "Transfer-Encoding": "chunked"})
        resp = await client.send(req)
        assert await resp.read_all() == b"{}"
        resp.release()
        (_, head, body), = srv.requests
        lines = head.decode().split("\r\n")
        assert lines[0] == f"POST /v1beta/models/a%20b:generateContent?alt=sse&key={SECRET} HTTP/1.1"
        fields = [tuple(x.split(": ", 1)) for x in lines[1:] if x]
        names = [k.lower() for k, _ in fields]
        assert sorted(names) == ["anthropic-beta", "authorization", "content-length", "content-type", "host"]
        got = {k.lower(): v for k, v in fields}
        assert got["host"] == f"127.0.0.1:{srv.port}" and got["content-length"] == str(len(body))
        assert got["content-type"] == "application/json; charset=utf-8"  # the caller's wins, once
        assert got["authorization"] == f"Bearer {SECRET}" and body == b'{"model":"m"}'
        assert_clean(client)


async def test_no_task_is_created_per_request(client_for):
    """The whole exchange runs in the caller's task (a Protocol server, so
    the server side creates none either)."""
    seen: list[int] = []

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.t, self.buf = transport, b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            if b"\r\n\r\n" in self.buf and self.buf.endswith(b"}"):
                self.buf = b""
                seen.append(len(asyncio.all_tasks()))
                self.t.write(ok(b'{"ok":1}'))

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Answer, "127.0.0.1", 0)
    try:
        client = client_for(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        baseline = len(asyncio.all_tasks())
        for _ in range(20):
            resp = await client.send(ureq())
            assert await resp.read_all() == b'{"ok":1}'
            resp.release()
        assert seen == [baseline] * 20 and len(asyncio.all_tasks()) == baseline
        assert client.connections_open == 1
    finally:
        server.close()


async def test_error_statuses_are_read_bounded_and_the_connection_kept(client_for):
    big = b'{"error": "' + b"e" * 2_000_000 + b'"}'
    answers = [b"HTTP/1.1 429 Too Many\r\nRetry-After: 3\r\nContent-Length: 22\r\n\r\n{\"error\": \"slow down\"}",
               b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://elsewhere.invalid/\r\nContent-Length: 0\r\n\r\n",
               b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big)]

    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        while await srv.next(reader, n):
            writer.write(answers[len(srv.requests) - 1])
            await writer.drain()

    async with Raw(serve) as srv:
        client = client_for(srv.url)
        with pytest.raises(UpstreamError) as e:
            await client.send(ureq())
        assert e.value.upstream_status == 429 and e.value.retry_after == 3 and "slow down" in e.value.message
        with pytest.raises(UpstreamError) as e:
            await client.send(ureq())
        assert e.value.upstream_status == 307 and "redirects are not followed" in e.value.message
        assert [n for n, _, _ in srv.requests] == [1, 1]  # read whole: the connection is reused
        with pytest.raises(UpstreamError) as e:
            await client.send(ureq())
        assert e.value.upstream_status == 500 and e.value.retryable
        assert client.pools[srv.url].idle_count == 0
        await eventually(lambda: client.connections_open == 0)  # body over MAX_ERROR_BODY: not read whole, closed
        assert_clean(client)


async def test_stall_before_the_head_is_a_first_byte_timeout(client_for):
    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        if await srv.next(reader, n):
            await srv.next(reader, n)  # silent until the client goes away

    async with Raw(serve) as srv:
        client = client_for(srv.url, first_byte_timeout=0.2)
        with pytest.raises(UpstreamError) as e:
            await client.send(ureq())
        assert e.value.kind == "upstream_timeout" and e.value.retryable and "first_byte_timeout" in e.value.message
        await eventually(lambda: srv.peer_closed == [1])  # the upstream request was closed
        assert_clean(client)


async def test_first_byte_deadline_also_bounds_the_connect(client_for):
    """The first-byte budget covers connecting: a connect hanging in SYN-SENT
    ends at first_byte_timeout when that is shorter than connect_timeout."""
    hole = Blackhole()
    try:
        client = client_for(f"http://127.0.0.1:{hole.port}", first_byte_timeout=0.3, connect_timeout=10)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(UpstreamError) as e:
            await client.send(ureq())
        waited = loop.time() - t0
        assert e.value.kind == "upstream_timeout" and "first_byte_timeout" in e.value.message
        assert 0.25 <= waited < 2.0
        assert_clean(client)
    finally:
        hole.close()


async def test_deadlines_fire_late_by_at_most_a_tick_and_only_while_waited_on():
    loop = asyncio.get_running_loop()
    d = h1.Deadlines(loop, tick=0.02)
    now = loop.time()
    early, late, answered = loop.create_future(), loop.create_future(), loop.create_future()
    d.add(early, now + 0.05)
    d.add(late, now + 0.3)
    d.add(answered, now + 0.05)
    answered.set_result("ok")  # done before its deadline: left alone
    with pytest.raises(TimeoutError):
        await early
    assert loop.time() - now < 0.25  # its deadline + a tick, well before the other deadline (slack for a busy CI)
    assert not late.done() and answered.result() == "ok"
    d.discard(late)  # the waiter went away (answered): nothing waits any more
    await asyncio.sleep(0.06)
    assert d.waiting == {} and d._handle is None  # the timer stopped
    assert not late.done()  # a discarded future is never failed
    late.cancel()


async def test_stalls_in_the_body(client_for):
    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        if await srv.next(reader, n):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            if n == 2:
                writer.write(b"5\r\nhello\r\n")
            await writer.drain()
            await srv.next(reader, n)

    async with Raw(serve) as srv:
        client = client_for(srv.url, first_byte_timeout=0.2, idle_timeout=0.2)
        resp = await client.send(ureq())  # headers, then nothing: the first-byte budget still runs
        with pytest.raises(UpstreamError) as e:
            await resp.read_chunk()
        assert e.value.kind == "upstream_timeout" and e.value.retryable and "first_byte_timeout" in e.value.message
        resp.close()
        resp = await client.send(ureq())
        assert await resp.read_chunk() == b"hello"
        with pytest.raises(UpstreamError) as e:
            await resp.read_chunk()
        assert e.value.kind == "upstream_timeout" and not e.value.retryable and "idle_timeout" in e.value.message
        resp.close()
        await eventually(lambda: srv.peer_closed == [1, 2])
        assert_clean(client)


async def test_a_cut_mid_body_is_an_upstream_failure(client_for):
    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        if await srv.next(reader, n):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ndata: 1\n\n")
            await writer.drain()

    async with Raw(serve) as srv:
        client = client_for(srv.url)
        resp = await client.send(ureq())
        assert await resp.read_chunk() == b"data: 1\n\n"
        with pytest.raises(UpstreamError) as e:
            await resp.read_chunk()
        assert e.value.kind == "upstream_failed" and not e.value.retryable and "mid-stream" in e.value.message
        resp.release()
        assert_clean(client)


async def test_garbage_through_send_is_a_retryable_upstream_failure(client_for):
    async with Raw(keepalive(b"220 mail.example ESMTP\r\n")) as srv:
        client = client_for(srv.url)
        with pytest.raises(UpstreamError) as e:
            await client.send(ureq())
        assert e.value.kind == "upstream_failed" and e.value.retryable and "invalid HTTP response" in e.value.message
        assert SECRET not in e.value.message
        assert_clean(client)


async def test_connect_failures(client_for, unused_tcp_port):
    client = client_for(f"http://127.0.0.1:{unused_tcp_port}")
    with pytest.raises(UpstreamError) as e:
        await client.send(ureq())
    assert e.value.kind == "upstream_failed" and e.value.retryable and "could not be reached" in e.value.message
    hole = Blackhole()
    try:
        client = client_for(f"http://127.0.0.1:{hole.port}", connect_timeout=0.2, first_byte_timeout=5)
        with pytest.raises(UpstreamError) as e:
            await client.send(ureq())
        assert e.value.kind == "upstream_timeout" and "connect_timeout" in e.value.message and e.value.retryable
        assert_clean(client)
    finally:
        hole.close()


async def test_close_at_shutdown_ends_streams(client_for):
    async def serve(srv: Raw, reader: Any, writer: Any, n: int) -> None:
        if await srv.next(reader, n):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
            await writer.drain()
            await srv.next(reader, n)

    async with Raw(serve) as srv:
        client = client_for(srv.url)
        resp = await client.send(ureq())
        assert await resp.read_chunk() == b"abc"
        await client.close()
        assert client.connections_open == 0
        with pytest.raises(UpstreamError):
            await resp.read_chunk()
        resp.release()
        await eventually(lambda: srv.peer_closed == [1])
        assert_clean(client)


# ---------------------------------------------------------------- https


async def test_https_pool_uses_a_verifying_context_and_sni(monkeypatch):
    pool = h1.H1Pool("https://api.example.com")
    assert pool.port == 443 and pool.host_line == "Host: api.example.com\r\n"
    assert isinstance(pool.ssl, ssl.SSLContext) and pool.ssl.verify_mode == ssl.CERT_REQUIRED and pool.ssl.check_hostname
    seen: dict[str, Any] = {}

    async def fake_connect(factory: Any, host: str, port: int, **kw: Any) -> Any:
        seen.update(host=host, port=port, **kw)
        raise ConnectionRefusedError(111, "refused")

    monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", fake_connect)
    with pytest.raises(h1.ConnectError, match="api.example.com:443"):
        await pool.request(pool.head("POST", "/v1/x", [], 0), b"")
    assert seen == {"host": "api.example.com", "port": 443, "ssl": pool.ssl, "server_hostname": "api.example.com"}
    assert h1.H1Pool("http://h.example").ssl is None and h1.H1Pool("http://h.example").port == 80


async def test_https_on_loopback_with_a_trusted_certificate(client_for):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"tls": request.secure, "body": (await request.read()).decode()})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        client = client_for(f"https://localhost:{port}/v1")
        client.ssl_context = client_ctx
        for _ in range(2):
            resp = await client.send(ureq("/chat/completions"))
            assert await resp.read_all() == b'{"tls": true, "body": "{\\"model\\":\\"m\\"}"}'
            resp.release()
        assert client.connections_open == 1
        # the default context does not trust the test CA: a clear connect failure
        other = client_for(f"https://localhost:{port}/v1")
        with pytest.raises(UpstreamError) as e:
            await other.send(ureq("/chat/completions"))
        assert e.value.kind == "upstream_failed" and "TLS" in e.value.message and "CERTIFICATE_VERIFY_FAILED" in e.value.message
        assert_clean(other)
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------- helpers


def test_request_target_and_split():
    assert h1.split_url("http://h:1/v1/x?a=1") == ("http://h:1", "/v1/x?a=1")
    assert h1.split_url("https://h") == ("https://h", "/")
    assert h1.request_target("/v1/x", {"a": "b c", "k": "v&w"}) == "/v1/x?a=b+c&k=v%26w"
    assert h1.request_target("/v1/x?alt=sse", {"key": "k"}) == "/v1/x?alt=sse&key=k"
    assert h1.request_target("/m/é 100%:go") == "/m/%C3%A9%20100%25:go"
    assert h1.request_target("/already%20quoted") == "/already%20quoted"
