"""Helpers shared by tests/test_reliability_*.py (test-only code)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from typing import Any

import aiohttp
import pytest

from cheapproxy.sse import SSEParser
from cheapproxy.testing.fault_upstream import Fault, FaultUpstream

PATHS = {"openai-chat": "/v1/chat/completions", "anthropic-messages": "/v1/messages"}


@pytest.fixture
async def faults():
    """``await faults(**kw)`` starts a FaultUpstream; all are closed after the test."""
    started: list[FaultUpstream] = []

    async def start(**kw: Any) -> FaultUpstream:
        f = await FaultUpstream(**kw).start()
        started.append(f)
        return f

    yield start
    for f in started:
        await f.close()


def model_toml(name: str, upstream: str | list[str], *, input: str = "1", output: str = "2", **extra: Any) -> str:
    up = json.dumps(upstream)
    s = f'[[models]]\nname = "{name}"\nupstream = {up}\n'
    s += "".join(f"{k} = {json.dumps(v)}\n" for k, v in extra.items())
    return s + f"[models.price]\ninput = {input}\noutput = {output}\n"


def body_for(protocol: str, model: str, text: str = "hello", stream: bool = False, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}]}
    if protocol == "anthropic-messages":
        body["max_tokens"] = 100
    if stream:
        body["stream"] = True
    body.update(extra)
    return body


def headers_for(protocol: str, key: str) -> dict[str, str]:
    if protocol == "anthropic-messages":
        return {"x-api-key": key, "anthropic-version": "2023-06-01"}
    return {"Authorization": f"Bearer {key}"}


async def post(gw: Any, protocol: str, body: dict[str, Any] | bytes, *, key: str | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    h = headers_for(protocol, key or gw.key)
    h.update(headers or {})
    data = body if isinstance(body, (bytes, bytearray)) else json.dumps(body)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + PATHS[protocol], data=data, headers=h) as r:
            return r.status, await r.read(), r.headers


def sse_frames(raw: bytes) -> list[tuple[str | None, str]]:
    p = SSEParser()
    frames = p.feed(raw) + p.close()
    return [(f.event, f.data) for f in frames]


def streamed_text(protocol: str, raw: bytes) -> str:
    """Concatenated text deltas of an OpenAI or Anthropic SSE body."""
    out = []
    for event, data in sse_frames(raw):
        if data == "[DONE]":
            continue
        try:
            obj = json.loads(data)
        except ValueError:
            continue
        if protocol == "openai-chat":
            for ch in obj.get("choices") or []:
                c = (ch.get("delta") or {}).get("content")
                if c:
                    out.append(c)
        elif obj.get("type") == "content_block_delta" and obj["delta"].get("type") == "text_delta":
            out.append(obj["delta"]["text"])
    return "".join(out)


def stream_error(protocol: str, raw: bytes) -> dict[str, Any] | None:
    """The in-stream error event, if the stream carries one."""
    for event, data in sse_frames(raw):
        try:
            obj = json.loads(data)
        except ValueError:
            continue
        if protocol == "openai-chat" and isinstance(obj, dict) and "error" in obj:
            return obj["error"]
        if protocol == "anthropic-messages" and event == "error":
            return obj["error"]
    return None


def clean_end(protocol: str, raw: bytes) -> bool:
    """The protocol's own end marker is present."""
    frames = sse_frames(raw)
    if protocol == "openai-chat":
        return any(d == "[DONE]" for _, d in frames)
    return any(e == "message_stop" for e, _ in frames)


async def raw_request(port: int, head: bytes, body: bytes = b"", *, read: bool = True, timeout: float = 10) -> bytes:
    """Send bytes on a fresh socket; return what came back until the peer closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body)
    await writer.drain()
    data = b""
    if read:
        try:
            async with asyncio.timeout(timeout):
                while chunk := await reader.read(65536):
                    data += chunk
                    if _complete(data):
                        break
        except (ConnectionError, TimeoutError):
            pass
    writer.close()
    return data


def _complete(data: bytes) -> bool:
    """A whole HTTP response with a Content-Length body arrived."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def settle(gw: Any) -> None:
    """Every request finished, every settlement done and the watcher's polling task gone."""
    await eventually(lambda: gw.proxy.inflight == 0)
    await gw.idle()
    await gw.proxy.watcher.idle()


__all__ = ["Fault", "FaultUpstream", "faults", "model_toml", "body_for", "headers_for", "post", "sse_frames",
           "streamed_text", "stream_error", "clean_end", "raw_request", "port_of", "open_fds", "rss_bytes",
           "free_port", "settle", "PATHS"]


class Blackhole:
    """A port that accepts nothing: the listen backlog is full, so a connect
    hangs in SYN-SENT (the connect timeout's test bed)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fill = []
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self.fill.append(c)

    def close(self) -> None:
        for c in self.fill:
            c.close()
        self.sock.close()


async def eventually(pred: Any, timeout: float = 5.0) -> None:
    """Wait for a condition that follows an event (bounded, never a timing assertion)."""
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.01)


REQUEST_PATH_TASKS = {"RequestHandler._handle_request", "finish_billing", "CallWatcher._run", "LeaseBilling._flush_loop"}


def request_tasks() -> list[Any]:
    """Pending tasks that belong to serving a request (handlers, settlements, the watcher)."""
    return [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") in REQUEST_PATH_TASKS]


class ServeProcess:
    """A real ``cheapproxy serve`` subprocess on a free port, with its own
    config file and SQLite database; stdout and stderr are collected."""

    def __init__(self, tmp_path: Any, config_toml: str, env: dict[str, str] | None = None) -> None:
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = tmp_path / "serve.db"
        self.config = tmp_path / "cheapproxy.toml"
        self.config.write_text(f'[server]\nhost = "127.0.0.1"\nport = {self.port}\ndatabase = "sqlite:///{self.db}"\n'
                               'log_format = "json"\nlog_level = "debug"\n' + config_toml)
        self.python = sys.executable
        self.env = {**os.environ, **(env or {})}
        self.proc: Any = None
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self._readers: list[Any] = []

    async def cli(self, *args: str, check: bool = True) -> tuple[int, str, str]:
        p = await asyncio.create_subprocess_exec(self.python, "-m", "cheapproxy", "--config", str(self.config), *args,
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                 env=self.env)
        out, err = await p.communicate()
        if check:
            assert p.returncode == 0, (args, out, err)
        return p.returncode, out.decode(), err.decode()

    async def start(self, *serve_args: str) -> ServeProcess:
        self.proc = await asyncio.create_subprocess_exec(
            self.python, "-m", "cheapproxy", "--config", str(self.config), "serve", *serve_args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=self.env)

        async def pump(stream: Any, sink: list[bytes]) -> None:
            while line := await stream.readline():
                sink.append(line)

        self._readers = [asyncio.create_task(pump(self.proc.stdout, self.out)),
                         asyncio.create_task(pump(self.proc.stderr, self.err))]
        await eventually(lambda: any(b"listening" in line for line in self.out) or self.proc.returncode is not None,
                         timeout=30)
        assert self.proc.returncode is None, self.stderr
        return self

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30) -> int:
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await asyncio.gather(*self._readers)
        return code

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for t in self._readers:
            t.cancel()

    @property
    def stdout(self) -> str:
        return b"".join(self.out).decode(errors="replace")

    @property
    def stderr(self) -> str:
        return b"".join(self.err).decode(errors="replace")
