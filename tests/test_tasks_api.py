"""The task API end to end on the built-in demo models (zero config): submit,
poll, result, ledger; synchronous images; every error case with its status
and body; ownership; hold accounting."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from cheapproxy.testing.task_fakes import tasks_toml

VIDEO_PATHS = ["/v1/videos/generations", "/v1/video/generations", "/video/v1/video/generations"]


async def call(gw: Any, method: str, path: str, *, key: str | None = None, **kw: Any) -> tuple[int, Any, Any]:
    headers = kw.pop("headers", {})
    if key is not False:
        headers.setdefault("Authorization", f"Bearer {key or gw.key}")
    async with aiohttp.ClientSession() as s:
        async with s.request(method, gw.url + path, headers=headers, allow_redirects=False, **kw) as r:
            body = await r.read()
            try:
                import orjson

                data = orjson.loads(body)
            except Exception:  # noqa: BLE001
                data = body
            return r.status, data, r.headers


async def ledger(gw: Any) -> list[Any]:
    user = await gw.storage.get_user(gw.user)
    return await gw.storage.ledger(user.id)


@pytest.mark.parametrize("path", VIDEO_PATHS)
async def test_video_task_succeeds_and_is_charged_once(task_gateway: Any, path: str) -> None:
    gw = await task_gateway(tasks_toml())
    status, body, headers = await call(gw, "POST", path, json={"model": "demo-video", "prompt": "two cats",
                                                                 "duration": 8, "resolution": "1080p"})
    assert status == 200, body
    assert body["status"] == "queued" and body["task_id"].startswith("task_") and body["held"] == "0.80"
    assert headers["x-request-id"].startswith("req_")
    done = await gw.proxy.task_service.wait_finished(body["task_id"])
    assert done.state == "succeeded"
    status, task, _ = await call(gw, "GET", f"/v1/tasks/{body['task_id']}")
    assert status == 200
    assert task["status"] == "succeeded" and task["cost"] == "0.80"  # 8 s x $0.10 (1080p)
    assert task["result_urls"][0].startswith("https://demo.cheapproxy.invalid/video/")
    assert task["usage"] == {"seconds": 8, "resolution": "1080p"}
    assert task["billed"] == {"tokens": None, "seconds": 8, "resolution": "1080p", "size": None, "source": "provider"}
    assert task["request"] == {"prompt": "two cats", "duration": 8, "resolution": "1080p", "size": None}
    assert task["error"] is None and task["held"] is None
    assert await gw.balance() == Decimal("9.20")
    rows = await ledger(gw)
    charges = [r for r in rows if r.kind == "task_charge"]
    assert [(r.amount, r.reference) for r in charges] == [(Decimal("-0.80"), body["task_id"])]
    user = await gw.storage.get_user(gw.user)
    assert user.held == 0 and await gw.storage.open_holds() == 0
    assert sum(r.amount for r in rows) == user.balance


async def test_seconds_is_accepted_as_duration_and_audio_has_no_resolution(task_gateway: Any) -> None:
    gw = await task_gateway(tasks_toml())
    status, body, _ = await call(gw, "POST", "/v1/audios/generations",
                                 json={"model": "demo-audio", "prompt": "a lullaby", "seconds": "12"})
    assert status == 200, body
    await gw.proxy.task_service.wait_finished(body["task_id"])
    _, task, _ = await call(gw, "GET", f"/v1/tasks/{body['task_id']}")
    assert (task["status"], task["cost"], task["kind"]) == ("succeeded", "0.12", "audio")
    assert task["result_urls"][0].endswith(".wav")
    assert await gw.balance() == Decimal("9.88")


async def test_failed_task_costs_nothing_and_releases_the_hold(task_gateway: Any) -> None:
    gw = await task_gateway(tasks_toml())
    _, body, _ = await call(gw, "POST", "/v1/videos/generations", json={"model": "demo-video", "prompt": "oops [fail]"})
    done = await gw.proxy.task_service.wait_finished(body["task_id"])
    assert done.state == "failed" and done.cost == Decimal(0)
    status, task, _ = await call(gw, "GET", f"/v1/tasks/{body['task_id']}")
    assert status == 200
    assert task["status"] == "failed" and task["cost"] == "0.00" and task["result_urls"] == []
    assert task["error"] == {"code": "demo_failure", "message": "The demo task failed on cue ('[fail]' in the prompt)."}
    assert await gw.balance() == Decimal("10.00")
    user = await gw.storage.get_user(gw.user)
    assert user.held == 0 and [r.kind for r in await ledger(gw)] == ["topup"]
    usage = await gw.storage.get_usage(body["task_id"])
    assert (usage.status, usage.cost, usage.protocol) == ("error", Decimal(0), "task-video")


async def test_sync_image_answers_in_openai_shape_and_charges_usage(task_gateway: Any) -> None:
    gw = await task_gateway(tasks_toml())
    status, body, headers = await call(gw, "POST", "/v1/images/generations",
                                       json={"model": "demo-image", "prompt": "a red fox", "n": 2})
    assert status == 200, body
    assert len(body["data"]) == 2 and body["data"][0]["b64_json"].startswith("iVBOR")
    assert body["usage"] == {"input_tokens": 3, "output_tokens": 200, "total_tokens": 203}
    # 3 x $1/M + 200 x $40/M = 0.008003, charged to the micro-dollar
    assert headers["x-cheapproxy-cost"] == "0.008003"
    assert await gw.balance() == Decimal("9.991997")
    assert [r.kind for r in await ledger(gw)] == ["topup", "charge"]


async def test_task_mode_image_model_returns_a_task(task_gateway: Any) -> None:
    gw = await task_gateway(tasks_toml())
    status, body, _ = await call(gw, "POST", "/v1/images/generations",
                                 json={"model": "demo-image-task", "prompt": "a red fox", "n": 2})
    assert status == 200 and body["status"] == "queued" and body["kind"] == "image", body
    assert body["held"] == "0.01"  # 200 tokens x $40/M = 0.008: a task hold is whole cents
    await gw.proxy.task_service.wait_finished(body["task_id"])
    _, task, _ = await call(gw, "GET", f"/v1/tasks/{body['task_id']}")
    assert (task["status"], task["cost"], len(task["result_urls"])) == ("succeeded", "0.01", 2)
    assert task["usage"] == {"images": 2, "output_tokens": 200}
    assert await gw.balance() == Decimal("9.99")


async def test_openai_sdk_images_generate(task_gateway: Any) -> None:
    from openai import AsyncOpenAI

    gw = await task_gateway(tasks_toml())
    client = AsyncOpenAI(api_key=gw.key, base_url=gw.url + "/v1", max_retries=0)
    res = await client.images.generate(model="demo-image", prompt="a red fox")
    assert res.data[0].b64_json.startswith("iVBOR") and res.usage.output_tokens == 100
    with pytest.raises(Exception) as exc:
        await client.images.generate(model="demo-video", prompt="x")
    assert getattr(exc.value, "status_code", None) == 400
    await client.close()


async def test_task_list_shows_only_own_tasks(task_gateway: Any) -> None:
    gw = await task_gateway(tasks_toml())
    _, mine, _ = await call(gw, "POST", "/v1/videos/generations", json={"model": "demo-video", "prompt": "mine"})
    await gw.create_user("bob")
    _, bob_key = await gw.create_key("bob")
    _, theirs, _ = await call(gw, "POST", "/v1/videos/generations", json={"model": "demo-video", "prompt": "bob's"},
                              key=bob_key)
    status, listing, _ = await call(gw, "GET", "/v1/tasks")
    assert status == 200 and [t["task_id"] for t in listing["data"]] == [mine["task_id"]]
    assert theirs["task_id"] != mine["task_id"]


# ------------------------------------------------------------------ errors


def err(body: Any) -> dict[str, Any]:
    assert set(body) == {"error"}, body
    return body["error"]


async def test_another_users_task_is_a_404_like_an_unknown_id(task_gateway: Any) -> None:
    gw = await task_gateway(tasks_toml())
    _, body, _ = await call(gw, "POST", "/v1/videos/generations", json={"model": "demo-video", "prompt": "private"})
    tid = body["task_id"]
    await gw.create_user("mallory")
    _, mallory = await gw.create_key("mallory")
    s1, b1, _ = await call(gw, "GET", f"/v1/tasks/{tid}", key=mallory)
    s2, b2, _ = await call(gw, "GET", "/v1/tasks/task_000000000000000000000000", key=mallory)
    assert (s1, s2) == (404, 404)
    assert err(b1)["code"] == err(b2)["code"] == "task_not_found"
    assert err(b1)["message"] == f"No task '{tid}' was found for this API key's user."
    s3, _, _ = await call(gw, "GET", f"/v1/tasks/{tid}/content", key=mallory)
    s4, _, _ = await call(gw, "GET", f"/v1/videos/{tid}", key=mallory)
    assert (s3, s4) == (404, 404)
    status, _, _ = await call(gw, "GET", f"/v1/tasks/{tid}")
    assert status == 200


@pytest.mark.parametrize(("body", "status", "param", "fragment"), [
    ({"prompt": "no model"}, 400, "model", "Missing required field 'model'"),
    ({"model": 7, "prompt": "x"}, 400, "model", "Missing required field 'model'"),
    ({"model": "no-such-model", "prompt": "x"}, 404, "model", "does not exist"),
    ({"model": "demo", "prompt": "x"}, 400, "model", "is a chat model"),
    ({"model": "demo-video"}, 400, "prompt", "Missing required field 'prompt'"),
    ({"model": "demo-video", "prompt": ""}, 400, "prompt", "non-empty string"),
    ({"model": "demo-video", "prompt": "x", "duration": 0}, 400, "duration", "whole number of seconds"),
    ({"model": "demo-video", "prompt": "x", "duration": 2**63}, 400, "duration", "whole number of seconds"),
    ({"model": "demo-video", "prompt": "x", "duration": 1.5}, 400, "duration", "whole number of seconds"),
    ({"model": "demo-video", "prompt": "x", "duration": True}, 400, "duration", "whole number of seconds"),
    ({"model": "demo-video", "prompt": "x", "duration": 4, "seconds": 8}, 400, "duration", "disagree"),
    ({"model": "demo-video", "prompt": "x", "resolution": "huge"}, 400, "resolution", "like '480p'"),
    ({"model": "demo-video", "prompt": "x", "resolution": "4k"}, 400, "resolution", "not offered for this model"),
    ({"model": "demo-video", "prompt": "x", "size": "wide"}, 400, "size", "aspect ratio"),
    ({"model": "demo-video", "prompt": "x", "api_key": "sk-x"}, 400, "api_key", "not accepted"),
    ({"model": "demo-video", "prompt": "x", "meta": {"base_url": "http://evil"}}, 400, "base_url", "not accepted"),
    ({"model": "demo-video", "prompt": "x", "callback_url": "http://127.0.0.1:9/hook"}, 400, "callback_url",
     "loopback"),
    ({"model": "demo-video", "prompt": "x", "callback_url": "http://localhost./hook"}, 400, "callback_url", "loopback"),
    ({"model": "demo-video", "prompt": "x", "callback_url": "file:///etc/passwd"}, 400, "callback_url", "http or https"),
    ({"model": "demo-video", "prompt": "x", "callback_url": "http://u:p@example.com/"}, 400, "callback_url",
     "credentials"),
])
async def test_submit_errors(task_gateway: Any, body: dict[str, Any], status: int, param: str, fragment: str) -> None:
    gw = await task_gateway(tasks_toml())
    got, answer, _ = await call(gw, "POST", "/v1/videos/generations", json=body)
    assert got == status, answer
    e = err(answer)
    assert e["param"] == param and fragment in e["message"], e
    assert await gw.storage.list_tasks() == [] and await gw.balance() == Decimal("10.00")


async def test_malformed_json_and_auth_and_permission_errors(task_gateway: Any) -> None:
    gw = await task_gateway(tasks_toml(), models=["demo-audio"])
    s, b, _ = await call(gw, "POST", "/v1/videos/generations", data=b"{not json", headers={"Content-Type": "application/json"})
    assert s == 400 and "not valid JSON" in err(b)["message"]
    s, b, _ = await call(gw, "POST", "/v1/videos/generations", data=b"[1]", headers={"Content-Type": "application/json"})
    assert s == 400 and err(b)["message"] == "Request body must be a JSON object."
    s, b, _ = await call(gw, "POST", "/v1/videos/generations", key=False, json={"model": "demo-video", "prompt": "x"})
    assert s == 401 and err(b)["code"] == "invalid_api_key"
    s, b, _ = await call(gw, "GET", "/v1/tasks/task_x", key="cp-wrong")
    assert s == 401 and err(b)["message"] == "Invalid API key."
    s, b, _ = await call(gw, "POST", "/v1/videos/generations", json={"model": "demo-video", "prompt": "x"})
    assert s == 403 and err(b)["message"] == "This API key is not allowed to use model 'demo-video'."


async def test_body_over_the_limit_is_413(task_gateway: Any) -> None:
    gw = await task_gateway("[server]\nmax_body_bytes = 200\n" + tasks_toml())
    s, b, _ = await call(gw, "POST", "/v1/videos/generations", json={"model": "demo-video", "prompt": "x" * 500})
    assert s == 413 and "larger than the limit of 200 bytes" in err(b)["message"]


async def test_balance_covers_one_video_but_not_two_at_once(task_gateway: Any) -> None:
    gw = await task_gateway(tasks_toml(poller=False), balance="0.30")  # one demo video holds $0.25
    s1, first, _ = await call(gw, "POST", "/v1/videos/generations", json={"model": "demo-video", "prompt": "one"})
    assert s1 == 200 and first["held"] == "0.25"
    s2, second, _ = await call(gw, "POST", "/v1/videos/generations", json={"model": "demo-video", "prompt": "two"})
    assert s2 == 402
    e = err(second)
    assert e["code"] == "insufficient_balance"
    assert e["message"].startswith("Insufficient balance: this video task may cost up to $0.25")
    assert "available balance is $0.05" in e["message"]
    user = await gw.storage.get_user(gw.user)
    assert (user.balance, user.held) == (Decimal("0.30"), Decimal("0.25"))
    # the first finishes (charged $0.25): the hold is gone, the next one still cannot start
    svc = gw.proxy.task_service
    task = await gw.storage.get_task(first["task_id"])
    assert await svc.poll_once(task) == "succeeded"
    s3, third, _ = await call(gw, "POST", "/v1/videos/generations", json={"model": "demo-video", "prompt": "three"})
    assert s3 == 402 and "available balance is $0.05" in err(third)["message"]
    assert await gw.balance() == Decimal("0.05")


async def test_failed_submit_releases_the_hold(task_gateway: Any) -> None:
    gw = await task_gateway(tasks_toml())
    s, body, _ = await call(gw, "POST", "/v1/images/generations", json={"model": "demo-image", "prompt": "[fail]"})
    assert s == 400 and "refused on cue" in err(body)["message"]
    user = await gw.storage.get_user(gw.user)
    # (a synchronous request's hold may sit in a balance lease for a moment: see cheapproxy.leases)
    assert user.balance == Decimal("10.00") and [e.kind for e in await gw.storage.ledger(user.id)] == ["topup"]
    [record] = await gw.storage.list_usage()
    assert (record.status, record.http_status, record.cost, record.protocol) == ("error", 400, Decimal(0), "openai-images")


async def test_content_of_a_direct_result_redirects(task_gateway: Any) -> None:
    gw = await task_gateway(tasks_toml(poller=False))
    _, body, _ = await call(gw, "POST", "/v1/videos/generations", json={"model": "demo-video", "prompt": "x"})
    tid = body["task_id"]
    s, b, _ = await call(gw, "GET", f"/v1/tasks/{tid}/content")
    assert s == 400 and err(b) == {"message": f"Task '{tid}' has no output (status: queued).", "type": "invalid_request_error",
                                   "param": "task_id", "code": "task_not_ready"}
    assert await gw.proxy.task_service.poll_once(await gw.storage.get_task(tid)) == "succeeded"
    s, _, headers = await call(gw, "GET", f"/v1/tasks/{tid}/content")
    _, task, _ = await call(gw, "GET", f"/v1/tasks/{tid}")
    assert s == 302 and headers["Location"] == task["result_urls"][0]
    s, b, _ = await call(gw, "GET", f"/v1/tasks/{tid}/content?index=3")
    assert s == 404 and err(b)["message"] == f"Task '{tid}' has 1 result(s)."


async def test_models_info_lists_task_models_with_prices(task_gateway: Any) -> None:
    gw = await task_gateway(tasks_toml())
    s, body, _ = await call(gw, "GET", "/v1/models/info")
    info = {m["id"]: m for m in body["data"]}
    assert info["demo-video"]["kind"] == "video"
    assert info["demo-video"]["price"] == {"scheme": "per_second_by_resolution", "unit": "USD per output second",
                                           "per_second": {"1080p": "0.10", "480p": "0.02", "720p": "0.05"}}
    assert info["demo-audio"]["price"]["per_second"] == {"default": "0.01"}
