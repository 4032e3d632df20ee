"""Webhooks: the SSRF guard (every address form, checked again at connect
time) and delivery with retries to a real loopback receiver."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.resolver import ThreadedResolver

from cheapproxy.tasks.webhook import GuardedResolver, UnsafeURL, WebhookSender, address_problem, check_url
from cheapproxy.testing.task_fakes import tasks_toml

DENIED = [
    ("http://127.0.0.1/", "loopback"),
    ("http://127.1.2.3:8080/x", "loopback"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[::ffff:10.0.0.1]/", "private"),
    ("http://[64:ff9b::7f00:1]/", "loopback"),
    ("http://[2002:7f00:1::1]/", "loopback"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://10.1.2.3/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://100.64.0.1/", "CGNAT"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://192.0.2.10/", "private"),  # documentation range: not a public address either
    ("http://2130706433/", "non-standard IPv4"),
    ("http://0x7f.0.0.1/", "non-standard IPv4"),
    ("http://0177.0.0.1/", "non-standard IPv4"),
    ("http://127.1/", "non-standard IPv4"),
    ("http://localhost/", "loopback"),
    ("http://LOCALHOST./", "loopback"),
    ("http://api.localhost/", "loopback"),
    ("file:///etc/passwd", "http or https"),
    ("gopher://example.com/", "http or https"),
    ("ftp://example.com/", "http or https"),
    ("http://user:pw@example.com/", "credentials"),
    ("http://@example.com/", "credentials"),
    ("http:///nohost", "no host"),
    ("http://example.com:0/", "invalid port"),
    ("http://example.com:99999/", "valid URL"),
    ("http://exa mple.com/", "spaces"),
    ("http://example.com/\r\nX-Injected: 1", "spaces"),
    ("", "http(s) URL"),
    ("http://example.com/" + "a" * 3000, "http(s) URL"),
]


@pytest.mark.parametrize(("url", "reason"), DENIED)
def test_check_url_refuses(url: str, reason: str) -> None:
    with pytest.raises(UnsafeURL) as exc:
        check_url(url)
    assert reason in str(exc.value)


@pytest.mark.parametrize("url", ["https://example.com/hook", "http://8.8.8.8:8080/cb?x=1", "https://[2606:4700::1111]/h"])
def test_check_url_accepts_public(url: str) -> None:
    assert check_url(url) == url


def test_allow_private_still_requires_http_and_no_credentials() -> None:
    assert check_url("http://127.0.0.1:9/h", allow_private=True) == "http://127.0.0.1:9/h"
    for url in ("file:///etc/passwd", "http://a:b@127.0.0.1/"):
        with pytest.raises(UnsafeURL):
            check_url(url, allow_private=True)


def test_address_problem_covers_mapped_and_embedded_forms() -> None:
    assert address_problem(ipaddress.ip_address("8.8.8.8")) is None
    assert address_problem(ipaddress.ip_address("::ffff:169.254.169.254")) == "a link-local address"
    assert address_problem(ipaddress.ip_address("64:ff9b::a9fe:a9fe")) == "a link-local address"
    assert address_problem(ipaddress.ip_address("2001:0:4136:e378:8000:63bf:3fff:fdd2")) == "a Teredo address"


class Receiver:
    """A loopback webhook receiver answering scripted statuses."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.got: list[tuple[dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append(({k.lower(): v for k, v in request.headers.items()}, await request.read()))
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="ok")


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Any:
    async def start(statuses: list[int] | None = None) -> tuple[Receiver, str]:
        r = Receiver(statuses)
        app = web.Application()
        app.router.add_post("/hook", r.handle)
        srv = await aiohttp_server(app)
        return r, str(srv.make_url("/hook"))

    return start


async def test_guard_refuses_names_resolving_inside_at_connect_time(receiver: Any, monkeypatch: Any) -> None:
    r, url = await receiver()
    port = url.split(":")[2].split("/")[0]
    sender = WebhookSender(allow_private=False, timeout_seconds=5, retries=0, backoff_seconds=0.01)
    real = ThreadedResolver.resolve

    async def rebinding(self: Any, host: str, port: int = 0, family: Any = 0) -> Any:
        # these names passed the check at submit time; now they point inside
        inside = {"rebind.example": "127.0.0.1", "rebind-private.example": "10.1.2.3", "meta.example": "169.254.169.254"}
        return await real(self, inside.get(host, host), port, family)

    monkeypatch.setattr(ThreadedResolver, "resolve", rebinding)
    for host, what in (("rebind.example", "a loopback"), ("rebind-private.example", "a private"),
                       ("meta.example", "a link-local")):
        ok, outcome = await sender.attempt(f"http://{host}:{port}/hook", {"x": 1}, "task.succeeded")
        assert (ok, outcome) == (False, f"refused: callback host {host!r} resolves to {what} address"), host
    assert r.got == []  # not one connection reached the receiver
    delivered, attempts, last = await sender.deliver(f"http://rebind.example:{port}/hook", {}, "task.failed")
    assert (delivered, attempts) == (False, 1) and last.startswith("refused:")  # no retries for a refused address
    await sender.close()
    assert r.got == []
    with pytest.raises(OSError, match="resolves to a loopback address"):
        await GuardedResolver().resolve("localhost", 80)


async def test_delivery_with_signature_and_retries(task_gateway: Any, receiver: Any) -> None:
    r, url = await receiver([500, 503])
    gw = await task_gateway(tasks_toml(webhook_allow_private=True, webhook_secret="whsec-test", webhook_retries=3))
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/videos/generations", headers={"Authorization": f"Bearer {gw.key}"},
                          json={"model": "demo-video", "prompt": "hook me", "callback_url": url}) as resp:
            assert resp.status == 200
            tid = (await resp.json())["task_id"]
    task = await wait_webhook(gw, tid)
    assert len(r.got) == 3  # 500, 503, then delivered
    headers, body = r.got[-1]
    payload = orjson.loads(body)
    assert payload["task_id"] == tid and payload["status"] == "succeeded" and payload["cost"] == "0.25"
    assert headers["x-cheapproxy-event"] == "task.succeeded" and headers["content-type"] == "application/json"
    assert headers["x-cheapproxy-signature"] == "sha256=" + hmac.new(b"whsec-test", body, hashlib.sha256).hexdigest()
    assert task.result["webhook"] == {"state": "delivered", "attempts": 3, "last": "HTTP 200"}


async def test_delivery_gives_up_after_the_retries(task_gateway: Any, receiver: Any) -> None:
    r, url = await receiver([500] * 10)
    gw = await task_gateway(tasks_toml(webhook_allow_private=True, webhook_retries=1))
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/audios/generations", headers={"Authorization": f"Bearer {gw.key}"},
                          json={"model": "demo-audio", "prompt": "[fail]", "callback_url": url}) as resp:
            tid = (await resp.json())["task_id"]
    task = await wait_webhook(gw, tid)
    assert task.result["webhook"] == {"state": "failed", "attempts": 2, "last": "HTTP 500"}
    assert [orjson.loads(b)["status"] for _, b in r.got] == ["failed", "failed"]
    assert r.got[0][0]["x-cheapproxy-event"] == "task.failed" and "x-cheapproxy-signature" not in r.got[0][0]


async def test_undelivered_webhook_is_sent_after_a_restart(task_gateway: Any, receiver: Any, tmp_path: Any) -> None:
    import asyncio

    r, url = await receiver()
    db = tmp_path / "hooks.db"
    cfg = tasks_toml(webhook_allow_private=True, poller=False)
    gw1 = await task_gateway(cfg, db=db)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw1.url + "/v1/videos/generations", headers={"Authorization": f"Bearer {gw1.key}"},
                          json={"model": "demo-video", "prompt": "later", "callback_url": url}) as resp:
            tid = (await resp.json())["task_id"]
    svc = gw1.proxy.task_service
    svc.webhooks.deliver = _never  # type: ignore[method-assign]  # the process dies before delivering
    assert await svc.poll_once(await gw1.storage.get_task(tid)) == "succeeded"
    await gw1.server.close()
    assert r.got == [] and "webhook" not in (await _row(db, tid)).result
    gw2 = await task_gateway(tasks_toml(webhook_allow_private=True), db=db)
    for _ in range(500):
        if r.got:
            break
        await asyncio.sleep(0.01)
    assert [orjson.loads(b)["task_id"] for _, b in r.got] == [tid]
    assert (await wait_webhook(gw2, tid)).result["webhook"]["state"] == "delivered"


async def wait_webhook(gw: Any, task_id: str) -> Any:
    """The task row once its webhook outcome is recorded."""
    import asyncio

    for _ in range(1000):
        task = await gw.storage.get_task(task_id)
        if task is not None and (task.result or {}).get("webhook"):
            return task
        await asyncio.sleep(0.01)
    raise AssertionError(f"no webhook outcome recorded for {task_id}")


async def _never(*_: Any, **__: Any) -> Any:
    import asyncio

    await asyncio.Event().wait()


async def _row(db: Any, task_id: str) -> Any:
    from cheapproxy.storage.sqlite import SQLiteStorage

    s = SQLiteStorage(f"sqlite:///{db}")
    await s.open()
    try:
        return await s.get_task(task_id)
    finally:
        await s.close()


async def test_submit_time_resolution_check(monkeypatch: Any) -> None:
    import asyncio
    import socket

    from cheapproxy.tasks.webhook import resolve_problem

    answers = {"inside.example": "10.0.0.5", "meta.example": "169.254.169.254", "public.example": "93.184.216.34"}

    async def fake_getaddrinfo(self: Any, host: str, *args: Any, **kw: Any) -> Any:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], 0))]

    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "getaddrinfo", fake_getaddrinfo)
    assert await resolve_problem("https://inside.example/h") == "a private address"
    assert await resolve_problem("https://meta.example/h") == "a link-local address"
    assert await resolve_problem("https://public.example/h") is None
    assert await resolve_problem("https://unknown.example/h") is None  # checked again at delivery
