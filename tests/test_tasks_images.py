"""Synchronous images relayed to an OpenAI-speaking upstream (the fake's
``/v1/images/generations``): body as is with the model renamed, billed from
the reported usage, or from the hold when the upstream reports none."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import aiohttp

from cheapproxy.testing.task_fakes import tasks_toml


def config(fake: Any) -> str:
    return f"""
[[upstreams]]
name = "oa"
provider = "openai"
base_url = "{fake.url}"
api_key = "upstream-secret"

[[models]]
name = "image-1"
upstream = "oa"
upstream_model = "gpt-image-1"
kind = "image"
max_output_tokens = 1000
[models.price]
input = 5.00
output = 40.00
""" + tasks_toml()


async def post(gw: Any, body: dict[str, Any]) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/images/generations", json=body,
                          headers={"Authorization": f"Bearer {gw.key}"}) as r:
            return r.status, await r.json(), r.headers


async def test_relay_with_usage(task_gateway: Any, fake_openai_video: Any) -> None:
    gw = await task_gateway(config(fake_openai_video))
    status, body, headers = await post(gw, {"model": "image-1", "prompt": "a lighthouse", "n": 2, "quality": "low"})
    assert status == 200, body
    assert [d["b64_json"][:5] for d in body["data"]] == ["iVBOR", "iVBOR"]
    assert body["usage"] == {"input_tokens": 12, "output_tokens": 544, "total_tokens": 556}
    assert (body["size"], body["quality"]) == ("1024x1024", "low")
    assert headers["x-cheapproxy-cost"] == "0.021820"  # 12 x 5 / 1M + 544 x 40 / 1M, in micro-dollars
    [req] = fake_openai_video.requests("POST")
    assert req["path"] == "/v1/images/generations" and req["headers"]["authorization"] == "Bearer upstream-secret"
    assert req["body"] == {"model": "gpt-image-1", "prompt": "a lighthouse", "n": 2, "quality": "low"}
    assert await gw.balance() == Decimal("9.97818")


async def test_relay_without_usage_charges_the_hold(task_gateway: Any, fake_openai_video: Any) -> None:
    gw = await task_gateway(config(fake_openai_video))
    status, body, headers = await post(gw, {"model": "image-1", "prompt": "[nousage]"})
    assert status == 200 and "usage" not in body
    [record] = await gw.storage.list_usage()
    assert record.usage_source == "estimated" and record.output_tokens == 1000
    assert Decimal(headers["x-cheapproxy-cost"]) == record.cost == Decimal("0.04") + record.input_tokens * Decimal("0.000005")


async def test_upstream_5xx_is_502_and_costs_nothing(task_gateway: Any, fake_openai_video: Any) -> None:
    gw = await task_gateway(config(fake_openai_video))
    status, body, _ = await post(gw, {"model": "image-1", "prompt": "[error500]"})
    assert status == 502 and "returned HTTP 500" in body["error"]["message"]
    assert await gw.balance() == Decimal("10.00")
    user = await gw.storage.get_user(gw.user)
    assert [e.kind for e in await gw.storage.ledger(user.id)] == ["topup"]
    [record] = await gw.storage.list_usage()
    assert (record.status, record.http_status, record.cost) == ("error", 502, Decimal(0))


async def test_n_is_bounded(task_gateway: Any, fake_openai_video: Any) -> None:
    gw = await task_gateway(config(fake_openai_video))
    for n in (0, 11, "2", True):
        status, body, _ = await post(gw, {"model": "image-1", "prompt": "x", "n": n})
        assert status == 400 and body["error"]["param"] == "n"
    assert fake_openai_video.requests() == []
