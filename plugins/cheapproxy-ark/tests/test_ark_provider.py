"""The ``ark`` provider type: request mapping, hold estimates, and submit /
poll over real HTTP against the loopback fake Ark (cheapproxy.testing.fake_ark)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from cheapproxy.config import UpstreamConfig
from cheapproxy.errors import ProxyError, UpstreamError
from cheapproxy.provider import NoOptions
from cheapproxy.tasks import TaskNotFound
from cheapproxy.testing.task_fakes import tasks_toml
from cheapproxy_ark.provider import ArkProvider

MODEL = "doubao-seedance-2-0-260128"


def ark(url: str = "http://127.0.0.1:9/api/v3", key: str = "upstream-secret") -> ArkProvider:
    return ArkProvider(UpstreamConfig(name="ark-main", provider="ark", base_url=url, api_key=key), NoOptions())


def spec(body: dict[str, Any], provider: ArkProvider | None = None) -> Any:
    return (provider or ark()).build_spec(body, kind="video", model="seedance", upstream_model=MODEL)


def test_request_body_maps_the_contract_fields() -> None:
    p = ark()
    body = p.request_body(spec({"prompt": "two cats", "duration": 8, "size": "9:16", "resolution": "1080p",
                                "generate_audio": True, "watermark": False, "seed": 7}))
    assert body == {"model": MODEL, "content": [{"type": "text", "text": "two cats"}], "duration": 8,
                    "resolution": "1080p", "ratio": "9:16", "generate_audio": True, "watermark": False, "seed": 7}
    body = p.request_body(spec({"prompt": "x", "size": "1280x720"}))
    assert (body["ratio"], body["resolution"]) == ("16:9", "720p")
    body = p.request_body(spec({"prompt": "x", "size": "auto", "duration": -1}))
    assert (body["ratio"], body["duration"]) == ("adaptive", -1)
    img = {"type": "image_url", "image_url": {"url": "https://img.example/a.png"}, "role": "first_frame"}
    body = p.request_body(spec({"prompt": "animate", "content": [img]}))
    assert body["content"] == [{"type": "text", "text": "animate"}, img]
    body = p.request_body(spec({"content": [{"type": "text", "text": "native Ark body"}]}))
    assert body["content"] == [{"type": "text", "text": "native Ark body"}] and "prompt" not in body


def test_build_spec_refuses_bad_content_and_missing_prompt() -> None:
    with pytest.raises(ProxyError, match="'content' must be an array"):
        spec({"prompt": "x", "content": "nope"})
    with pytest.raises(ProxyError, match=r"Missing required field 'prompt' \(or 'content'\)"):
        spec({"duration": 5})


@pytest.mark.parametrize(("body", "tokens", "seconds"), [
    ({}, 114_345, 5),                                    # 720p, 5 s: ceil(921600 x 1.05 x 121 / 1024)
    ({"resolution": "1080p", "duration": 10}, 512_427, 10),
    ({"resolution": "480p", "frames": 57}, 23_940, 3),   # frames win: 57 / 24 fps -> 3 s
    ({"duration": -1}, None, None),                      # the model chooses: no estimate (hold the maximum)
])
def test_estimate(body: dict[str, Any], tokens: int | None, seconds: int | None) -> None:
    est = ark().estimate(spec({"prompt": "x", **body}))
    assert (est.tokens, est.seconds) == (tokens, seconds)


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_submit_and_poll_through_success(fake_ark: Any, session: Any) -> None:
    p = ark(fake_ark.url)
    tid = await p.submit(session, spec({"prompt": "cats", "duration": 5}))
    assert tid.startswith("cgt-")
    first = await p.poll(session, tid)
    assert (first.state, first.usage_tokens, first.result_urls) == ("running", None, ())
    done = await p.poll(session, tid)
    assert done.state == "succeeded"
    assert done.usage == {"completion_tokens": 108_900, "total_tokens": 108_900} and done.usage_tokens == 108_900
    assert (done.seconds, done.resolution, done.size) == (5, "720p", "16:9")
    assert done.result_urls == (f"https://ark-content-generation-cn-beijing.tos-cn-beijing.volces.com/fake/{tid}.mp4",)
    [post, get1, _] = fake_ark.log
    assert post["headers"]["authorization"] == "Bearer upstream-secret" and post["body"]["model"] == MODEL
    assert get1["path"] == f"/api/v3/contents/generations/tasks/{tid}"


async def test_failure_and_loss(fake_ark: Any, session: Any) -> None:
    p = ark(fake_ark.url)
    failed = await p.poll(session, await p.submit(session, spec({"prompt": "[fail]"})))
    assert (failed.state, failed.error_code) == ("failed", "OutputVideoSensitiveContentDetected")
    assert failed.error_message == "The request failed because the output video may contain sensitive information."
    cancelled = await p.poll(session, await p.submit(session, spec({"prompt": "[cancel]"})))
    assert cancelled.state == "cancelled"
    with pytest.raises(TaskNotFound):
        await p.poll(session, await p.submit(session, spec({"prompt": "[forget]"})))
    with pytest.raises(TaskNotFound):
        await p.poll(session, "cgt-does-not-exist/../../x")


async def test_upstream_errors(fake_ark: Any, session: Any) -> None:
    with pytest.raises(UpstreamError) as exc:
        await ark(fake_ark.url, key="sk-wrong-key-1234").submit(session, spec({"prompt": "x"}))
    assert exc.value.status == 502 and exc.value.retryable and "sk-wrong-key-1234" not in exc.value.message
    with pytest.raises(UpstreamError) as exc:
        await ark(fake_ark.url).submit(session, spec({"prompt": "[error500]"}))
    assert exc.value.status == 502 and exc.value.retryable and "InternalServiceError" in exc.value.message
    with pytest.raises(UpstreamError) as exc:
        await ark(fake_ark.url).submit(session, spec({"prompt": "x", "duration": 99}))
    assert (exc.value.status, exc.value.retryable) == (400, False)
    assert "The parameter `duration` specified in the request is not valid." in exc.value.message
    with pytest.raises(UpstreamError) as exc:
        await ark("http://127.0.0.1:9/api/v3").poll(session, "cgt-1")
    assert exc.value.retryable and exc.value.kind == "upstream_failed"


def test_map_status_edge_cases() -> None:
    p = ark()
    expired = p.map_status({"id": "cgt-1", "status": "expired"})
    assert (expired.state, expired.error_code) == ("failed", "expired")
    assert p.map_status({"id": "cgt-1", "status": "something-new"}).state == "running"
    s = p.map_status({"status": "succeeded", "frames": 57, "framespersecond": 24, "usage": {"completion_tokens": True,
                                                                                              "total_tokens": 42}})
    assert (s.seconds, s.usage_tokens, s.result_urls) == (3, 42, ())
    with pytest.raises(UpstreamError):
        p.map_status(["not", "an", "object"])


def test_plugin_is_discovered_through_its_entry_point() -> None:
    from cheapproxy.registry import build_registry

    reg = build_registry()
    assert reg.provider_types["ark"] is ArkProvider
    owner = reg.owners[("provider_types", "ark")]
    assert (owner, reg.plugins[owner].distribution) == ("ark", "cheapproxy-ark")


async def test_through_the_gateway(task_gateway: Any, fake_ark: Any) -> None:
    gw = await task_gateway(fake_ark.toml("ark-main") + f"""
[[models]]
name = "seedance-2"
upstream = "ark-main"
upstream_model = "{MODEL}"
kind = "video"
[models.price]
output = 3.00
""" + tasks_toml())
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/video/v1/video/generations", headers={"Authorization": f"Bearer {gw.key}"},
                          json={"model": "seedance-2", "prompt": "Two cats run", "size": "9:16", "duration": 5,
                                "generate_audio": True, "watermark": False}) as r:
            body = await r.json()
            assert r.status == 200 and body["status"] == "queued"
    done = await gw.proxy.task_service.wait_finished(body["task_id"])
    assert (done.state, done.cost) == ("succeeded", Decimal("0.33"))  # 108,900 tokens x $3/M = 0.3267
    assert await gw.balance() == Decimal("9.67")
