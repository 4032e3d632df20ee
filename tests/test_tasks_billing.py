"""Task billing and durability against the loopback fake Ark upstream (real
HTTP, real SQLite): charged once on success at the exact, rounded amount;
nothing on failure, cancellation, a lost task or a passed deadline; racing
pollers charge once; a restarted gateway resumes and finishes its tasks."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from cheapproxy.tasks import TaskService
from cheapproxy.testing.task_fakes import tasks_toml

PRICE = "2.50"  # USD per 1M usage tokens (task tokens count as output)


def ark_config(fake: Any, *, scheme: str = "per_token", extra: str = "", tasks: dict[str, Any] | None = None,
               upstream: str = '"ark-main"') -> str:
    price = (f"[models.price]\noutput = {PRICE}\n" if scheme == "per_token" else
             '[models.price]\nscheme = "per_second_by_resolution"\n[models.price.per_second]\n"720p" = 0.07\n"1080p" = 0.12\n')
    return (fake.toml("ark-main") + extra + f"""
[[models]]
name = "seedance-2"
upstream = {upstream}
upstream_model = "doubao-seedance-2-0-260128"
kind = "video"
{price}
""" + tasks_toml(**(tasks or {})))


async def submit(gw: Any, body: dict[str, Any], key: str | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/videos/generations", json={"model": "seedance-2", **body},
                          headers={"Authorization": f"Bearer {key or gw.key}"}) as r:
            return r.status, await r.json()


async def get_task(gw: Any, task_id: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + f"/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {gw.key}"}) as r:
            assert r.status == 200
            return await r.json()


async def charges(gw: Any) -> list[tuple[Decimal, str]]:
    user = await gw.storage.get_user(gw.user)
    return [(e.amount, e.reference) for e in await gw.storage.ledger(user.id) if e.kind == "task_charge"]


async def assert_books_balance(gw: Any) -> None:
    user = await gw.storage.get_user(gw.user)
    assert user.held == 0 and await gw.storage.open_holds() == 0
    assert sum(e.amount for e in await gw.storage.ledger(user.id)) == user.balance


async def test_success_is_charged_once_from_usage_tokens_rounded_half_up(task_gateway: Any, fake_ark: Any) -> None:
    gw = await task_gateway(ark_config(fake_ark))
    status, body = await submit(gw, {"prompt": "cats chase [tokens=50000]", "size": "9:16", "generate_audio": True,
                                     "callback_url": None})
    assert status == 200, body
    assert body["held"] == "0.29"  # 720p x 5 s estimate: 114,345 tokens at $2.50/M -> 0.2858625 -> 0.29
    done = await gw.proxy.task_service.wait_finished(body["task_id"])
    assert done.state == "succeeded" and done.cost == Decimal("0.13")  # 50,000 x 2.50 / 1M = 0.125 -> half up
    task = await get_task(gw, body["task_id"])
    assert task["cost"] == "0.13" and task["usage"] == {"completion_tokens": 50000, "total_tokens": 50000}
    assert task["result_urls"] == [f"https://ark-content-generation-cn-beijing.tos-cn-beijing.volces.com/fake/{done.provider_task_id}.mp4"]
    assert task["billed"]["tokens"] == 50000 and task["billed"]["source"] == "provider"
    assert await charges(gw) == [(Decimal("-0.13"), body["task_id"])]
    assert await gw.balance() == Decimal("9.87")
    await assert_books_balance(gw)
    record = await gw.storage.get_usage(body["task_id"])
    assert (record.output_tokens, record.cost, record.status, record.upstream) == (50000, Decimal("0.13"), "ok", "ark-main")
    # what Ark received: the contract's fields in Ark's terms, nothing else added, nothing leaked
    [create] = fake_ark.requests("POST")
    assert create["path"] == "/api/v3/contents/generations/tasks"
    assert create["headers"]["authorization"] == "Bearer upstream-secret"
    assert create["body"] == {"model": "doubao-seedance-2-0-260128", "generate_audio": True, "ratio": "9:16",
                              "content": [{"type": "text", "text": "cats chase [tokens=50000]"}]}


@pytest.mark.parametrize(("prompt", "cost"), [
    ("default usage", "0.27"),        # 1280x720, 121 frames: 108,900 tokens -> 0.27225
    ("tiny [tokens=1000]", "0.01"),   # 0.0025 is never charged as 0.00
    ("big [tokens=400000]", "1.00"),  # more than the hold: charged in full (the balance covers it)
])
async def test_charge_amounts(task_gateway: Any, fake_ark: Any, prompt: str, cost: str) -> None:
    gw = await task_gateway(ark_config(fake_ark))
    _, body = await submit(gw, {"prompt": prompt})
    done = await gw.proxy.task_service.wait_finished(body["task_id"])
    assert (done.state, done.cost) == ("succeeded", Decimal(cost))
    assert await charges(gw) == [(-Decimal(cost), body["task_id"])]
    await assert_books_balance(gw)


async def test_per_second_pricing_uses_the_reported_duration_and_resolution(task_gateway: Any, fake_ark: Any) -> None:
    gw = await task_gateway(ark_config(fake_ark, scheme="per_second"))
    _, body = await submit(gw, {"prompt": "x", "duration": 10, "resolution": "1080p"})
    assert body["held"] == "1.20"
    done = await gw.proxy.task_service.wait_finished(body["task_id"])
    assert done.cost == Decimal("1.20")
    assert (await get_task(gw, body["task_id"]))["billed"] == {
        "tokens": 488025, "seconds": 10, "resolution": "1080p", "size": "16:9", "source": "provider"}
    status, refused = await submit(gw, {"prompt": "x", "resolution": "480p"})
    assert status == 400 and refused["error"]["message"] == (
        "Resolution '480p' is not offered for this model (priced: 1080p, 720p).")


async def test_auto_duration_holds_the_configured_maximum(task_gateway: Any, fake_ark: Any) -> None:
    gw = await task_gateway(ark_config(fake_ark, tasks={"hold_max_usd": 1.5}))
    _, body = await submit(gw, {"prompt": "x", "duration": -1})
    assert body["held"] == "1.50"
    done = await gw.proxy.task_service.wait_finished(body["task_id"])
    assert done.cost == Decimal("0.43")  # the fake makes 8 s: 1280x720x193/1024 = 173,700 tokens


@pytest.mark.parametrize(("prompt", "code", "message"), [
    ("[fail]", "OutputVideoSensitiveContentDetected",
     "The request failed because the output video may contain sensitive information."),
    ("[cancel]", "cancelled", "The provider cancelled the task."),
    ("[forget]", "provider_lost_task", "The provider no longer knows this task."),
])
async def test_failures_cost_nothing(task_gateway: Any, fake_ark: Any, prompt: str, code: str, message: str) -> None:
    gw = await task_gateway(ark_config(fake_ark))
    _, body = await submit(gw, {"prompt": prompt})
    done = await gw.proxy.task_service.wait_finished(body["task_id"])
    assert (done.state, done.cost) == ("failed", Decimal(0))
    task = await get_task(gw, body["task_id"])
    assert task["error"] == {"code": code, "message": message} and task["cost"] == "0.00"
    assert await charges(gw) == [] and await gw.balance() == Decimal("10.00")
    await assert_books_balance(gw)


async def test_a_stall_past_the_deadline_fails_and_releases(task_gateway: Any, fake_ark: Any) -> None:
    gw = await task_gateway(ark_config(fake_ark, tasks={"deadline_seconds": 0.3}))
    _, body = await submit(gw, {"prompt": "slow [stall]"})
    done = await gw.proxy.task_service.wait_finished(body["task_id"])
    assert done.state == "failed" and done.attempts >= 1
    assert (await get_task(gw, body["task_id"]))["error"] == {
        "code": "deadline_exceeded", "message": "The task did not finish within 0.3 seconds."}
    polls = len(fake_ark.requests("GET"))
    assert polls >= 2  # polled while running, and once more at the deadline
    assert await charges(gw) == [] and await gw.balance() == Decimal("10.00")
    await assert_books_balance(gw)


async def test_rejected_submit_is_an_error_and_costs_nothing(task_gateway: Any, fake_ark: Any) -> None:
    gw = await task_gateway(ark_config(fake_ark))
    status, body = await submit(gw, {"prompt": "[reject]"})
    assert status == 400
    assert body["error"]["message"] == ("upstream 'ark-main' returned HTTP 400: The request failed because the input text "
                                        "may contain sensitive information. (InputTextSensitiveContentDetected)")
    [task] = await gw.storage.list_tasks()
    assert task.state == "failed" and (task.result or {})["error_code"] == "submit_failed"
    await assert_books_balance(gw)
    assert await gw.balance() == Decimal("10.00")


async def test_unreachable_first_upstream_falls_back_to_the_next(task_gateway: Any, fake_ark: Any) -> None:
    dead = 'base_url = "http://127.0.0.1:9/api/v3"'
    extra = f'[[upstreams]]\nname = "ark-dead"\nprovider = "ark"\n{dead}\napi_key = "k"\nconnect_timeout = 2\n'
    gw = await task_gateway(ark_config(fake_ark, extra=extra, upstream='["ark-dead", "ark-main"]'))
    status, body = await submit(gw, {"prompt": "fallback"})
    assert status == 200, body
    done = await gw.proxy.task_service.wait_finished(body["task_id"])
    assert done.upstream == "ark-main" and done.state == "succeeded"


async def _scripted_ark(aiohttp_server: Any, answer: Any, poll: Any = None) -> tuple[str, dict[str, int]]:
    """An Ark-like upstream whose create is ``await answer()`` (and whose task
    GET is ``await poll()``); it counts the creates it received and the most
    it had in flight at once."""
    seen = {"creates": 0, "in_flight": 0, "most": 0}

    async def create(request: web.Request) -> web.Response:
        seen["creates"] += 1
        seen["in_flight"] += 1
        seen["most"] = max(seen["most"], seen["in_flight"])
        try:
            return await answer()
        finally:
            seen["in_flight"] -= 1

    app = web.Application()
    app.router.add_post("/api/v3/contents/generations/tasks", create)
    if poll is not None:
        app.router.add_get("/api/v3/contents/generations/tasks/{task_id}", lambda request: poll())
    server = await aiohttp_server(app)
    return str(server.make_url("/api/v3")), seen


async def test_a_failing_upstream_cools_down_and_later_submits_skip_it(task_gateway: Any, fake_ark: Any,
                                                                       aiohttp_server: Any) -> None:
    """Task submits count for the upstream's circuit breaker, as chat requests
    do: after cooldown_after_failures 5xx answers the upstream is skipped
    while it cools down (before, every submit tried it first)."""
    async def fail() -> web.Response:
        return web.json_response({"error": {"code": "InternalServiceError", "message": "down"}}, status=500)

    url, seen = await _scripted_ark(aiohttp_server, fail)
    extra = (f'[[upstreams]]\nname = "ark-bad"\nprovider = "ark"\nbase_url = "{url}"\napi_key = "upstream-secret"\n'
             "[routing]\ncooldown_after_failures = 2\ncooldown_base_seconds = 60\n")
    gw = await task_gateway(ark_config(fake_ark, extra=extra, upstream='["ark-bad", "ark-main"]', tasks={"poller": False}))
    for n in range(3):
        status, body = await submit(gw, {"prompt": f"submit {n}"})
        assert status == 200, body
        assert (await gw.storage.get_task(body["task_id"])).upstream == "ark-main"
    assert seen["creates"] == 2  # the third submit went straight to the healthy upstream
    assert not gw.proxy.clients["ark-bad"].breaker.available()


async def test_failed_polls_count_for_the_breaker_and_the_task_waits(task_gateway: Any, aiohttp_server: Any) -> None:
    """Polls count for the breaker too: 5xx answers to polls cool the
    upstream down; the task itself stays queued (a poll failure is
    transient until the task's deadline)."""
    async def accept() -> web.Response:
        return web.json_response({"id": "cgt-poll-1"})

    async def fail() -> web.Response:
        return web.json_response({"error": {"code": "InternalServiceError", "message": "down"}}, status=500)

    url, _ = await _scripted_ark(aiohttp_server, accept, fail)
    cfg = (f'[[upstreams]]\nname = "ark-flaky"\nprovider = "ark"\nbase_url = "{url}"\napi_key = "upstream-secret"\n'
           "[routing]\ncooldown_after_failures = 2\ncooldown_base_seconds = 60\n"
           '[[models]]\nname = "seedance-2"\nupstream = "ark-flaky"\nupstream_model = "doubao-seedance-2-0-260128"\n'
           f'kind = "video"\n[models.price]\noutput = {PRICE}\n' + tasks_toml(poller=False))
    gw = await task_gateway(cfg)
    status, body = await submit(gw, {"prompt": "x"})
    assert status == 200, body
    breaker = gw.proxy.clients["ark-flaky"].breaker
    assert breaker.available()  # the submit succeeded
    service = TaskService(gw.proxy)
    for _ in range(2):
        assert await service.poll_once(await gw.storage.get_task(body["task_id"])) == "queued"
    assert not breaker.available()
    assert gw.proxy.clients["ark-flaky"].busy == 0  # each poll gave its connection slot back


async def test_task_submits_share_the_upstreams_connection_limit(task_gateway: Any, aiohttp_server: Any) -> None:
    """A submit holds one of the upstream's max_connections: with one, a
    second submit while the first is in flight gets a 503 after
    pool_timeout_seconds (before, both reached the upstream at once)."""
    gate = asyncio.Event()

    async def slow() -> web.Response:
        await gate.wait()
        return web.json_response({"id": "cgt-slow-1"})

    url, seen = await _scripted_ark(aiohttp_server, slow)
    cfg = (f'[[upstreams]]\nname = "ark-slow"\nprovider = "ark"\nbase_url = "{url}"\napi_key = "upstream-secret"\n'
           "max_connections = 1\n[routing]\npool_timeout_seconds = 0.3\n"
           '[[models]]\nname = "seedance-2"\nupstream = "ark-slow"\nupstream_model = "doubao-seedance-2-0-260128"\n'
           f'kind = "video"\n[models.price]\noutput = {PRICE}\n' + tasks_toml(poller=False))
    gw = await task_gateway(cfg)
    first = asyncio.create_task(submit(gw, {"prompt": "first"}))
    while seen["creates"] == 0:
        await asyncio.sleep(0.01)
    status, body = await asyncio.wait_for(submit(gw, {"prompt": "second"}), 5)
    assert status == 503 and "busy" in body["error"]["message"], body
    gate.set()
    status, body = await asyncio.wait_for(first, 5)
    assert status == 200, body
    assert seen == {"creates": 1, "in_flight": 0, "most": 1}
    # the refused submit failed at no cost and its hold was released; the first one's is still held
    tasks = {t.state: t for t in await gw.storage.list_tasks()}
    assert set(tasks) == {"failed", "queued"} and tasks["queued"].id == body["task_id"]
    assert await gw.storage.open_holds() == 1 and await gw.balance() == Decimal("10.00")


async def test_upstream_credential_refused_is_a_502_without_the_key(task_gateway: Any, fake_ark: Any) -> None:
    cfg = ark_config(fake_ark).replace('api_key = "upstream-secret"', 'api_key = "wrong-secret-123"')
    gw = await task_gateway(cfg)
    status, body = await submit(gw, {"prompt": "x"})
    assert status == 502 and "refused the gateway's credentials" in body["error"]["message"]
    assert "wrong-secret-123" not in str(body)


async def test_three_pollers_racing_on_a_finished_task_charge_once(task_gateway: Any, fake_ark: Any) -> None:
    gw = await task_gateway(ark_config(fake_ark, tasks={"poller": False}))
    _, body = await submit(gw, {"prompt": "race [stall] [tokens=200000]"})
    fake_ark.store[next(iter(fake_ark.store))].finished = "succeeded"
    snapshot = await gw.storage.get_task(body["task_id"])
    pollers = [TaskService(gw.proxy) for _ in range(3)]
    states = await asyncio.gather(*(p.poll_once(snapshot) for p in pollers))
    assert sorted(states) == ["queued", "queued", "succeeded"]  # two lost the compare-and-set
    assert await charges(gw) == [(Decimal("-0.50"), body["task_id"])]
    # pollers that read the row later find it final and do nothing
    again = await asyncio.gather(*(p.poll_once(snapshot) for p in pollers))
    assert again == ["queued"] * 3
    assert await charges(gw) == [(Decimal("-0.50"), body["task_id"])]
    await assert_books_balance(gw)


async def test_three_gateways_on_one_database_racing_charge_once(task_gateway: Any, fake_ark: Any, tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    cfg = ark_config(fake_ark, tasks={"poller": False})
    gws = [await task_gateway(cfg, db=db) for _ in range(3)]
    _, body = await submit(gws[0], {"prompt": "race [stall] [tokens=200000]"})
    fake_ark.store[next(iter(fake_ark.store))].finished = "succeeded"
    rows = [await g.storage.get_task(body["task_id"]) for g in gws]
    states = await asyncio.gather(*(g.proxy.task_service.poll_once(r) for g, r in zip(gws, rows)))
    assert states.count("succeeded") == 1
    assert await charges(gws[1]) == [(Decimal("-0.50"), body["task_id"])]
    await assert_books_balance(gws[2])


async def test_restart_mid_task_resumes_and_charges_once(task_gateway: Any, fake_ark: Any, tmp_path: Path) -> None:
    db = tmp_path / "restart.db"
    gw1 = await task_gateway(ark_config(fake_ark), db=db)
    _, body = await submit(gw1, {"prompt": "long one [stall] [tokens=80000]"})
    for _ in range(500):  # until the first gateway has polled it at least once
        if fake_ark.requests("GET"):
            break
        await asyncio.sleep(0.01)
    polls_before = len(fake_ark.requests("GET"))
    assert polls_before >= 1
    await gw1.server.close()  # the gateway stops; the task is still running upstream
    row = await _read_row(db, body["task_id"])
    assert row.state == "running" and row.provider_task_id
    fake_ark.store[row.provider_task_id].finished = "succeeded"
    gw2 = await task_gateway(ark_config(fake_ark), db=db)
    done = await gw2.proxy.task_service.wait_finished(body["task_id"])
    assert done.state == "succeeded" and done.cost == Decimal("0.20")
    assert len(fake_ark.requests("GET")) > polls_before
    assert await charges(gw2) == [(Decimal("-0.20"), body["task_id"])]
    assert await gw2.balance() == Decimal("9.80")
    await assert_books_balance(gw2)


async def _read_row(db: Path, task_id: str) -> Any:
    from cheapproxy.storage.sqlite import SQLiteStorage

    s = SQLiteStorage(f"sqlite:///{db}")
    await s.open()
    try:
        return await s.get_task(task_id)
    finally:
        await s.close()


@pytest.mark.parametrize("settled_before_crash", [False, True])
async def test_a_crash_during_finalisation_is_completed_once(task_gateway: Any, fake_ark: Any, tmp_path: Path,
                                                             settled_before_crash: bool) -> None:
    """A row left 'finalizing' (the outcome claimed, the process died before or
    after settling the hold) is completed by the next gateway: one charge."""
    db = tmp_path / "crash.db"
    gw1 = await task_gateway(ark_config(fake_ark, tasks={"poller": False}), db=db)
    _, body = await submit(gw1, {"prompt": "x [stall] [tokens=120000]"})
    fake_ark.store[next(iter(fake_ark.store))].finished = "succeeded"
    svc = gw1.proxy.task_service
    task = await gw1.storage.get_task(body["task_id"])

    async def crash(self: Any, t: Any) -> str:  # the process dies right after the claim (or after the settle)
        if settled_before_crash:
            await original(self, t)
            assert await gw1.storage.update_task(t.id, expect_state="succeeded", state="finalizing", cost=None)
        raise asyncio.CancelledError

    original = TaskService._complete
    TaskService._complete = crash  # type: ignore[method-assign]
    try:
        with pytest.raises(asyncio.CancelledError):
            await svc.poll_once(task)
    finally:
        TaskService._complete = original  # type: ignore[method-assign]
    await gw1.server.close()
    assert (await _read_row(db, body["task_id"])).state == "finalizing"
    gw2 = await task_gateway(ark_config(fake_ark), db=db)
    done = await gw2.proxy.task_service.wait_finished(body["task_id"])
    assert (done.state, done.cost) == ("succeeded", Decimal("0.30"))
    assert await charges(gw2) == [(Decimal("-0.30"), body["task_id"])]
    await assert_books_balance(gw2)


async def test_a_task_whose_submit_never_completed_fails_after_a_restart(task_gateway: Any, fake_ark: Any,
                                                                         tmp_path: Path) -> None:
    db = tmp_path / "orphan.db"
    gw1 = await task_gateway(ark_config(fake_ark, tasks={"poller": False}), db=db)
    _, body = await submit(gw1, {"prompt": "x [stall]"})
    # as if the process had died between writing the row and hearing from Ark
    await gw1.storage.update_task(body["task_id"], provider_task_id=None)
    await gw1.server.close()
    gw2 = await task_gateway(ark_config(fake_ark), db=db)
    row = await gw2.storage.get_task(body["task_id"])
    await gw2.storage.update_task(row.id, next_poll_at=row.created_at)  # its submit grace is over
    done = await gw2.proxy.task_service.wait_finished(body["task_id"])
    assert done.state == "failed" and (done.result or {})["error_code"] == "submit_interrupted"
    await assert_books_balance(gw2)
    assert await gw2.balance() == Decimal("10.00")


async def test_hold_accounting_balance_for_one_video_not_two(task_gateway: Any, fake_ark: Any) -> None:
    gw = await task_gateway(ark_config(fake_ark), balance="0.40")  # one 720p/5 s video holds $0.29
    s1, first = await submit(gw, {"prompt": "one [stall]"})
    s2, second = await submit(gw, {"prompt": "two [stall]"})
    assert (s1, s2) == (200, 402)
    assert second["error"]["code"] == "insufficient_balance"
    assert len(fake_ark.requests("POST")) == 1  # the refused task never reached Ark
    user = await gw.storage.get_user(gw.user)
    assert (user.balance, user.held) == (Decimal("0.40"), Decimal("0.29"))
    assert (await gw.storage.get_task(first["task_id"])).state in ("queued", "running")
