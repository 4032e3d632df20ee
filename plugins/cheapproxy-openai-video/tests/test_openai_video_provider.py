"""The ``openai-video`` provider type: field mapping, submit / poll / content
over real HTTP against the loopback fake, and the official ``openai`` SDK's
``videos`` resource used against the gateway."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from cheapproxy.config import UpstreamConfig
from cheapproxy.errors import ProxyError, StartupError, UpstreamError
from cheapproxy.provider import NoOptions
from cheapproxy.tasks import TaskNotFound
from cheapproxy.testing.fake_openai_video import FAKE_MP4, FAKE_WEBP
from cheapproxy.testing.task_fakes import tasks_toml
from cheapproxy_openai_video.provider import OpenAIVideoProvider


def oav(url: str = "http://127.0.0.1:9/v1", key: str = "upstream-secret") -> OpenAIVideoProvider:
    return OpenAIVideoProvider(UpstreamConfig(name="sora", provider="openai-video", base_url=url, api_key=key),
                               NoOptions())


def spec(body: dict[str, Any], provider: OpenAIVideoProvider | None = None) -> Any:
    return (provider or oav()).build_spec(body, kind="video", model="sora-2", upstream_model="sora-2")


@pytest.mark.parametrize(("body", "size", "resolution"), [
    ({"size": "1280x720"}, "1280x720", "720p"),
    ({"size": "16:9"}, "1280x720", "720p"),
    ({"size": "9:16", "resolution": "1080p"}, "1080x1920", "1080p"),
    ({"resolution": "720p"}, "720x1280", "720p"),  # the API's default orientation is portrait
    ({"size": "1792x1024"}, "1792x1024", "1080p"),
    ({}, None, None),
])
def test_size_mapping(body: dict[str, Any], size: str | None, resolution: str | None) -> None:
    s = spec({"prompt": "x", **body})
    assert (s.size, s.resolution) == (size, resolution)


def test_request_body_and_refusals() -> None:
    p = oav()
    assert p.request_body(spec({"prompt": "a fox", "seconds": 8, "size": "16:9", "user": "u1"})) == {
        "user": "u1", "model": "sora-2", "prompt": "a fox", "seconds": "8", "size": "1280x720"}
    with pytest.raises(ProxyError, match="takes 16:9 or 9:16 videos"):
        spec({"prompt": "x", "size": "1:1"})
    with pytest.raises(ProxyError, match="needs 'seconds'"):
        spec({"prompt": "x", "duration": -1})
    with pytest.raises(ProxyError, match="Missing required field 'prompt'"):
        spec({"seconds": 4})


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_submit_poll_and_content(fake_openai_video: Any, session: Any) -> None:
    p = oav(fake_openai_video.url)
    vid = await p.submit(session, spec({"prompt": "a fox", "seconds": 8, "size": "1280x720"}))
    [create] = fake_openai_video.requests("POST")
    assert create["content_type"] == "application/json" and create["headers"]["authorization"] == "Bearer upstream-secret"
    assert create["body"] == {"model": "sora-2", "prompt": "a fox", "seconds": "8", "size": "1280x720"}
    first = await p.poll(session, vid)
    assert (first.state, first.progress, first.usage) == ("running", 50, None)
    done = await p.poll(session, vid)
    assert done.state == "succeeded" and done.result_urls == ()
    assert (done.seconds, done.size, done.resolution, done.usage) == (8, "1280x720", "720p",
                                                                     {"seconds": "8", "size": "1280x720"})
    resp = await p.fetch_content(session, vid, None)
    try:
        assert resp.status == 200 and await resp.read() == FAKE_MP4 + vid.encode()
    finally:
        resp.release()
    with pytest.raises(ProxyError, match="'variant' must be one of"):
        await p.fetch_content(session, vid, "poster")


async def test_failure_loss_and_errors(fake_openai_video: Any, session: Any) -> None:
    p = oav(fake_openai_video.url)
    failed = await p.poll(session, await p.submit(session, spec({"prompt": "[fail]"})))
    assert (failed.state, failed.error_code) == ("failed", "moderation_blocked")
    with pytest.raises(TaskNotFound):
        await p.poll(session, await p.submit(session, spec({"prompt": "[forget]"})))
    with pytest.raises(UpstreamError) as exc:
        await p.submit(session, spec({"prompt": "x", "seconds": 5}))
    assert exc.value.status == 400 and "Invalid value: '5'" in exc.value.message
    with pytest.raises(UpstreamError) as exc:
        await oav(fake_openai_video.url, key="sk-nope-123456").submit(session, spec({"prompt": "x"}))
    assert exc.value.status == 502 and "sk-nope-123456" not in exc.value.message


def test_plugin_is_discovered_and_refuses_token_prices() -> None:
    import tomllib

    from cheapproxy.catalog import build_catalog
    from cheapproxy.config import parse_config
    from cheapproxy.registry import build_registry
    from cheapproxy.tasks import validate_task_models

    reg = build_registry()
    assert reg.provider_types["openai-video"] is OpenAIVideoProvider
    assert reg.plugins[reg.owners[("provider_types", "openai-video")]].distribution == "cheapproxy-openai-video"
    toml = ('[[upstreams]]\nname = "sora"\nprovider = "openai-video"\napi_key = "k"\n'
            '[[models]]\nname = "sora-2"\nupstream = "sora"\nkind = "video"\n[models.price]\noutput = 1\n')
    with pytest.raises(StartupError, match="priced by tokens but provider type 'openai-video' reports only seconds"):
        validate_task_models(build_catalog(parse_config(tomllib.loads(toml)), reg))


def gateway_config(fake: Any, **tasks: Any) -> str:
    return fake.toml("sora") + """
[[models]]
name = "sora-2"
upstream = "sora"
kind = "video"
[models.price]
scheme = "per_second_by_resolution"
[models.price.per_second]
"720p" = 0.10
"1792x1024" = 0.50
"1024x1792" = 0.50
""" + tasks_toml(**tasks)


async def test_official_sdk_create_retrieve_download_through_the_gateway(task_gateway: Any, fake_openai_video: Any) -> None:
    from openai import AsyncOpenAI

    gw = await task_gateway(gateway_config(fake_openai_video))
    client = AsyncOpenAI(api_key=gw.key, base_url=gw.url + "/v1", max_retries=0)
    video = await client.videos.create(model="sora-2", prompt="A calico cat playing a piano", seconds="8",
                                       size="1280x720")
    assert (video.object, video.status, video.seconds, video.size, video.progress) == ("video", "queued", "8", "1280x720", 0)
    [create] = fake_openai_video.requests("POST")
    assert create["body"] == {"model": "sora-2", "prompt": "A calico cat playing a piano", "seconds": "8",
                              "size": "1280x720"}
    await gw.proxy.task_service.wait_finished(video.id)
    done = await client.videos.retrieve(video.id)
    assert (done.status, done.progress, done.error) == ("completed", 100, None)
    content = await client.videos.download_content(video.id)
    provider_id = next(iter(fake_openai_video.store))
    assert content.content == FAKE_MP4 + provider_id.encode()
    thumb = await client.videos.download_content(video.id, variant="thumbnail")
    assert thumb.content == FAKE_WEBP
    assert await gw.balance() == Decimal("9.20")  # 8 s x $0.10 (1280x720 is 720p)
    await client.close()


async def test_task_api_points_at_the_gateways_content_url(task_gateway: Any, fake_openai_video: Any) -> None:
    gw = await task_gateway(gateway_config(fake_openai_video))
    headers = {"Authorization": f"Bearer {gw.key}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/videos/generations", headers=headers,
                          json={"model": "sora-2", "prompt": "pro shot", "size": "1024x1792", "duration": 4}) as r:
            tid = (await r.json())["task_id"]
        await gw.proxy.task_service.wait_finished(tid)
        async with s.get(gw.url + f"/v1/tasks/{tid}", headers=headers) as r:
            task = await r.json()
        assert task["result_urls"] == [f"{gw.url}/v1/tasks/{tid}/content"] and task["cost"] == "2.00"
        async with s.get(task["result_urls"][0], headers=headers) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "video/mp4"
            assert (await r.read()).startswith(FAKE_MP4)
            assert "upstream-secret" not in str(r.headers)
        async with s.get(task["result_urls"][0] + "?variant=poster", headers=headers) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "variant"
        await gw.create_user("eve")
        _, eve = await gw.create_key("eve")
        async with s.get(task["result_urls"][0], headers={"Authorization": f"Bearer {eve}"}) as r:
            assert r.status == 404


@pytest.mark.parametrize(("prompt", "code"), [
    ("[fail]", "moderation_blocked"),
    ("[forget]", "provider_lost_task"),
    ("[stall]", "deadline_exceeded"),
])
async def test_unfinished_videos_cost_nothing(task_gateway: Any, fake_openai_video: Any, prompt: str, code: str) -> None:
    gw = await task_gateway(gateway_config(fake_openai_video, deadline_seconds=0.3))
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/videos/generations", headers={"Authorization": f"Bearer {gw.key}"},
                          json={"model": "sora-2", "prompt": prompt, "seconds": 8}) as r:
            body = await r.json()
            assert r.status == 200 and body["held"] == "0.80"
    done = await gw.proxy.task_service.wait_finished(body["task_id"])
    assert (done.state, done.cost, (done.result or {}).get("error_code")) == ("failed", Decimal(0), code)
    user = await gw.storage.get_user(gw.user)
    assert (user.balance, user.held) == (Decimal("10.00"), Decimal(0))
    assert [e.kind for e in await gw.storage.ledger(user.id)] == ["topup"]


async def test_restart_mid_video_resumes_and_charges_once(task_gateway: Any, fake_openai_video: Any,
                                                          tmp_path: Any) -> None:
    import asyncio

    db = tmp_path / "sora.db"
    gw1 = await task_gateway(gateway_config(fake_openai_video), db=db)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw1.url + "/v1/videos/generations", headers={"Authorization": f"Bearer {gw1.key}"},
                          json={"model": "sora-2", "prompt": "long [stall]", "seconds": 12, "size": "16:9"}) as r:
            tid = (await r.json())["task_id"]
    for _ in range(500):
        if fake_openai_video.requests("GET"):
            break
        await asyncio.sleep(0.01)
    await gw1.server.close()
    video = next(iter(fake_openai_video.store.values()))
    video.finished = "completed"
    gw2 = await task_gateway(gateway_config(fake_openai_video), db=db)
    done = await gw2.proxy.task_service.wait_finished(tid)
    assert (done.state, done.cost) == ("succeeded", Decimal("1.20"))  # 12 s x $0.10 (1280x720)
    user = await gw2.storage.get_user(gw2.user)
    assert [(e.kind, e.amount) for e in await gw2.storage.ledger(user.id)] == [("topup", Decimal("10")), ("task_charge", Decimal("-1.20"))]
