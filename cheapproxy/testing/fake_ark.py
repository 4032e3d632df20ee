"""Loopback fake of the Volcengine Ark content-generation task API (tests).

Serve it under a base URL ending in ``/api/v3``.  Wire format as documented
for ``POST /api/v3/contents/generations/tasks`` (answer ``{"id": "cgt-..."}``)
and ``GET /api/v3/contents/generations/tasks/{id}`` (``status`` queued /
running / succeeded / failed / cancelled; on success ``content.video_url`` and
``usage.completion_tokens == usage.total_tokens``; ``resolution``, ``ratio``,
``duration``, ``framespersecond``; ``error {code, message}`` on failure).
Bodies are written out here by hand, never built by cheapproxy's plugin.

The outcome is scripted by tags in the text prompt (the first ``content``
item of type ``text``):

| tag | outcome |
|---|---|
| (none) | first poll ``running``, second poll ``succeeded`` |
| ``[polls=N]`` | ``succeeded`` on the N-th poll (``running`` before) |
| ``[fail]`` | ``failed`` on the first poll |
| ``[cancel]`` | ``cancelled`` on the first poll |
| ``[stall]`` | ``running`` forever (until a test calls ``finish``) |
| ``[forget]`` | every poll answers 404 (the provider lost the task) |
| ``[tokens=N]`` | report N usage tokens (default: W x H x (duration x 24 + 1) / 1024) |
| ``[nousage]`` | succeed without a ``usage`` object |
| ``[reject]`` | create answers 400 ``InvalidParameter`` |
| ``[error500]`` | create answers 500 |

The credential expected is ``Authorization: Bearer upstream-secret``.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import attrs
from aiohttp import web

SECRET = "upstream-secret"
CREATED = 1743414619
FPS = 24
# pixel size by resolution and ratio (Seedance; 720p 16:9 5 s = 108900 tokens, as the docs' example)
_DIMS = {
    "480p": {"16:9": (864, 480), "9:16": (480, 864), "1:1": (640, 640), "4:3": (736, 544), "3:4": (544, 736), "21:9": (960, 416)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "1:1": (960, 960), "4:3": (1112, 834), "3:4": (834, 1112), "21:9": (1470, 630)},
    "1080p": {"16:9": (1920, 1080), "9:16": (1080, 1920), "1:1": (1440, 1440), "4:3": (1664, 1248), "3:4": (1248, 1664), "21:9": (2206, 946)},
}
RATIOS = {"16:9", "9:16", "1:1", "4:3", "3:4", "21:9", "adaptive", "keep_ratio"}
CONTENT_TYPES = {"text", "image_url", "video_url", "audio_url", "draft_task"}


@attrs.define
class FakeTask:
    id: str
    model: str
    prompt: str
    resolution: str
    ratio: str
    duration: int
    polls: int = 0
    finished: str | None = None  # set by a test to end a [stall] task: "succeeded" / "failed"


TASKS_KEY: web.AppKey[dict[str, FakeTask]] = web.AppKey("fake_ark.tasks", dict)
LOG_KEY: web.AppKey[list[dict[str, Any]]] = web.AppKey("fake_ark.log", list)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _error(status: int, code: str, message: str, etype: str) -> web.Response:
    body = {"error": {"code": code, "message": message, "param": "", "type": etype}}
    return web.Response(status=status, text=_dumps(body), content_type="application/json")


def _auth(request: web.Request) -> web.Response | None:
    if request.headers.get("Authorization") == f"Bearer {SECRET}":
        return None
    return _error(401, "AuthenticationError", "The API key in the request is missing or invalid.", "Unauthorized")


def _tag_int(prompt: str, name: str) -> int | None:
    m = re.search(r"\[" + name + r"=(\d+)\]", prompt)
    return int(m.group(1)) if m else None


def tokens_for(resolution: str, ratio: str, duration: int) -> int:
    w, h = _DIMS.get(resolution, _DIMS["720p"]).get(ratio, _DIMS.get(resolution, _DIMS["720p"])["16:9"])
    return w * h * (duration * FPS + 1) // 1024


def _validate(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "The request body must be a JSON object."
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "The parameter `model` specified in the request is not valid."
    content = body.get("content")
    if not isinstance(content, list) or not content:
        return "The parameter `content` specified in the request is not valid: a non-empty array is required."
    for item in content:
        if not isinstance(item, dict) or item.get("type") not in CONTENT_TYPES:
            return "The parameter `content.type` specified in the request is not valid."
        if item["type"] == "text" and not isinstance(item.get("text"), str):
            return "The parameter `content.text` specified in the request is not valid."
    if "resolution" in body and body["resolution"] not in _DIMS:
        return "The parameter `resolution` specified in the request is not valid."
    if "ratio" in body and body["ratio"] not in RATIOS:
        return "The parameter `ratio` specified in the request is not valid."
    d = body.get("duration")
    if d is not None and (isinstance(d, bool) or not isinstance(d, int) or not (d == -1 or 2 <= d <= 15)):
        return "The parameter `duration` specified in the request is not valid."
    return None


async def create(request: web.Request) -> web.Response:
    log = request.app[LOG_KEY]
    try:
        body = await request.json()
    except ValueError:
        body = None
    log.append({"method": request.method, "path": request.path, "query": dict(request.query),
                "headers": {k.lower(): v for k, v in request.headers.items()}, "body": body})
    denied = _auth(request)
    if denied:
        return denied
    problem = _validate(body)
    if problem:
        return _error(400, "InvalidParameter", problem, "BadRequest")
    prompt = next((c["text"] for c in body["content"] if c.get("type") == "text"), "")
    if "[reject]" in prompt:
        return _error(400, "InputTextSensitiveContentDetected", "The request failed because the input text may "
                      "contain sensitive information.", "BadRequest")
    if "[error500]" in prompt:
        return _error(500, "InternalServiceError", "The service encountered an unexpected internal error.",
                      "InternalServerError")
    tid = "cgt-20250331175019-" + secrets.token_hex(3)[:5]
    duration = body.get("duration", 5)
    request.app[TASKS_KEY][tid] = FakeTask(
        id=tid, model=body["model"], prompt=prompt, resolution=body.get("resolution", "720p"),
        ratio=body.get("ratio", "16:9") if body.get("ratio") not in ("adaptive", "keep_ratio") else "16:9",
        duration=duration if duration != -1 else 8)
    return web.Response(text=_dumps({"id": tid}), content_type="application/json")


def _outcome(t: FakeTask) -> str:
    p = t.prompt
    if t.finished:
        return t.finished
    if "[fail]" in p:
        return "failed"
    if "[cancel]" in p:
        return "cancelled"
    if "[stall]" in p:
        return "running"
    need = _tag_int(p, "polls") or 2
    return "succeeded" if t.polls >= need else "running"


async def get(request: web.Request) -> web.Response:
    request.app[LOG_KEY].append({"method": request.method, "path": request.path, "query": dict(request.query),
                               "headers": {k.lower(): v for k, v in request.headers.items()}, "body": None})
    denied = _auth(request)
    if denied:
        return denied
    t = request.app[TASKS_KEY].get(request.match_info["task_id"])
    if t is None or "[forget]" in t.prompt:
        return _error(404, "ResourceNotFound", "The specified task could not be found.", "NotFound")
    t.polls += 1
    status = _outcome(t)
    out: dict[str, Any] = {"id": t.id, "model": t.model, "status": status, "error": None, "created_at": CREATED,
                           "updated_at": CREATED + 10 * t.polls, "seed": 10, "resolution": t.resolution,
                           "ratio": t.ratio, "duration": t.duration, "framespersecond": FPS}
    if status == "succeeded":
        out["content"] = {"video_url": f"https://ark-content-generation-cn-beijing.tos-cn-beijing.volces.com/fake/{t.id}.mp4"}
        if "[nousage]" not in t.prompt:
            n = _tag_int(t.prompt, "tokens")
            n = n if n is not None else tokens_for(t.resolution, t.ratio, t.duration)
            out["usage"] = {"completion_tokens": n, "total_tokens": n}
    elif status == "failed":
        out["error"] = {"code": "OutputVideoSensitiveContentDetected",
                        "message": "The request failed because the output video may contain sensitive information."}
    return web.Response(text=_dumps(out), content_type="application/json")


async def delete(request: web.Request) -> web.Response:
    denied = _auth(request)
    if denied:
        return denied
    t = request.app[TASKS_KEY].get(request.match_info["task_id"])
    if t is None:
        return _error(404, "ResourceNotFound", "The specified task could not be found.", "NotFound")
    t.finished = "cancelled"
    return web.Response(text="{}", content_type="application/json")


def make_app(log: list[dict[str, Any]] | None = None) -> web.Application:
    app = web.Application()
    app[LOG_KEY] = log if log is not None else []
    app[TASKS_KEY] = {}
    app.router.add_post("/api/v3/contents/generations/tasks", create)
    app.router.add_get("/api/v3/contents/generations/tasks/{task_id}", get)
    app.router.add_delete("/api/v3/contents/generations/tasks/{task_id}", delete)
    return app
