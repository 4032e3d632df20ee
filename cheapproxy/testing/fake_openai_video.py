"""Loopback fake of the OpenAI Videos API, plus the Images API (tests).

Serve it under a base URL ending in ``/v1``.  Wire format as the ``openai``
SDK (3.54, ``resources/videos.py`` and ``types/video.py``) reads it:

* ``POST /v1/videos`` (JSON, or multipart/form-data as the SDK sends it):
  ``prompt`` (required), ``model``, ``seconds`` (a string: "4", "8", "12";
  "16", "20" are accepted too), ``size`` ("720x1280", "1280x720",
  "1024x1792", "1792x1024", "1920x1080", "1080x1920") -> a ``video`` object,
  ``status: "queued"``.
* ``GET /v1/videos/{id}``: the ``video`` object; ``status`` queued ->
  in_progress -> completed | failed, ``progress``, ``seconds``, ``size``,
  ``error {code, message}``; header ``openai-poll-after-ms``.
* ``GET /v1/videos/{id}/content[?variant=video|thumbnail|spritesheet]``: the
  bytes of a completed video (404 before).
* ``POST /v1/images/generations``: gpt-image style answer with ``usage``.

Outcomes are scripted by tags in the prompt, as in ``fake_ark``: (none)
completes on the second poll, ``[polls=N]``, ``[fail]``, ``[stall]``,
``[forget]``, ``[reject]``, ``[error500]``, and for images ``[nousage]``.
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
CREATED = 1712697600
SIZES = {"720x1280", "1280x720", "1024x1792", "1792x1024", "1920x1080", "1080x1920"}
SECONDS = {"4", "8", "12", "16", "20"}
FAKE_MP4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isomfake-video-bytes"
FAKE_WEBP = b"RIFF\x0c\x00\x00\x00WEBPVP8 fake-thumbnail"
PNG_1X1 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


@attrs.define
class FakeVideo:
    id: str
    model: str
    prompt: str
    seconds: str
    size: str
    polls: int = 0
    finished: str | None = None  # set by a test to end a [stall] video: "completed" / "failed"


VIDEOS_KEY: web.AppKey[dict[str, FakeVideo]] = web.AppKey("fake_openai_video.videos", dict)
LOG_KEY: web.AppKey[list[dict[str, Any]]] = web.AppKey("fake_openai_video.log", list)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _error(status: int, message: str, etype: str = "invalid_request_error", *, param: str | None = None,
           code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": etype, "param": param, "code": code}}
    return web.Response(status=status, text=_dumps(body), content_type="application/json")


def _auth(request: web.Request) -> web.Response | None:
    if request.headers.get("Authorization") == f"Bearer {SECRET}":
        return None
    return _error(401, "Incorrect API key provided.", code="invalid_api_key")


async def _record(request: web.Request) -> Any:
    body: Any = None
    if request.method == "POST":
        if request.content_type.startswith("multipart/") or request.content_type == "application/x-www-form-urlencoded":
            form = await request.post()
            body = {k: (v if isinstance(v, str) else f"<file {getattr(v, 'filename', '')}>") for k, v in form.items()}
        else:
            try:
                body = await request.json()
            except ValueError:
                body = None
    request.app[LOG_KEY].append({"method": request.method, "path": request.path, "query": dict(request.query),
                                 "headers": {k.lower(): v for k, v in request.headers.items()}, "body": body,
                                 "content_type": request.content_type})
    return body


def _tag_int(prompt: str, name: str) -> int | None:
    m = re.search(r"\[" + name + r"=(\d+)\]", prompt)
    return int(m.group(1)) if m else None


def _status(v: FakeVideo) -> str:
    if v.finished:
        return v.finished
    if v.polls == 0:
        return "queued"
    if "[fail]" in v.prompt:
        return "failed"
    if "[stall]" in v.prompt:
        return "in_progress"
    return "completed" if v.polls >= (_tag_int(v.prompt, "polls") or 2) else "in_progress"


def _video(v: FakeVideo) -> dict[str, Any]:
    status = _status(v)
    done = status in ("completed", "failed")
    return {
        "id": v.id, "object": "video", "model": v.model, "status": status,
        "progress": 100 if status == "completed" else (0 if status == "queued" else 50),
        "created_at": CREATED, "completed_at": CREATED + 60 if done else None,
        "expires_at": CREATED + 3600 if status == "completed" else None,
        "prompt": v.prompt, "seconds": v.seconds, "size": v.size, "remixed_from_video_id": None,
        "error": {"code": "moderation_blocked", "message": "Your request was blocked by our moderation system."}
        if status == "failed" else None,
    }


async def create_video(request: web.Request) -> web.Response:
    body = await _record(request)
    denied = _auth(request)
    if denied:
        return denied
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str) or not body["prompt"]:
        return _error(400, "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
    seconds = str(body.get("seconds", "4"))
    if seconds not in SECONDS:
        return _error(400, f"Invalid value: '{seconds}'. Supported values are: '4', '8', and '12'.", param="seconds",
                      code="invalid_value")
    size = body.get("size", "720x1280")
    if size not in SIZES:
        return _error(400, f"Invalid value: '{size}'.", param="size", code="invalid_value")
    if "[reject]" in body["prompt"]:
        return _error(400, "Your request was rejected as a result of our safety system.", code="moderation_blocked")
    if "[error500]" in body["prompt"]:
        return _error(500, "The server had an error while processing your request.", "server_error")
    v = FakeVideo(id="video_" + secrets.token_hex(12), model=str(body.get("model", "sora-2")), prompt=body["prompt"],
                  seconds=seconds, size=size)
    request.app[VIDEOS_KEY][v.id] = v
    return web.Response(text=_dumps(_video(v)), content_type="application/json")


def _lookup(request: web.Request) -> FakeVideo | web.Response:
    v = request.app[VIDEOS_KEY].get(request.match_info["video_id"])
    if v is None or "[forget]" in v.prompt:
        return _error(404, f"Video with id '{request.match_info['video_id']}' not found.", param="video_id",
                      code="video_not_found")
    return v


async def retrieve_video(request: web.Request) -> web.Response:
    await _record(request)
    denied = _auth(request)
    if denied:
        return denied
    v = _lookup(request)
    if isinstance(v, web.Response):
        return v
    v.polls += 1
    return web.Response(text=_dumps(_video(v)), content_type="application/json",
                        headers={"openai-poll-after-ms": "1000"})


async def video_content(request: web.Request) -> web.Response:
    await _record(request)
    denied = _auth(request)
    if denied:
        return denied
    v = _lookup(request)
    if isinstance(v, web.Response):
        return v
    if _status(v) != "completed":
        return _error(404, "Video is not ready yet.", code="video_not_ready")
    variant = request.query.get("variant", "video")
    if variant == "thumbnail":
        return web.Response(body=FAKE_WEBP, content_type="image/webp")
    if variant != "video":
        return _error(400, f"Invalid value: '{variant}'.", param="variant", code="invalid_value")
    return web.Response(body=FAKE_MP4 + v.id.encode(), content_type="video/mp4")


async def images(request: web.Request) -> web.Response:
    body = await _record(request)
    denied = _auth(request)
    if denied:
        return denied
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str) or not isinstance(body.get("model"), str):
        return _error(400, "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
    if "[error500]" in body["prompt"]:
        return _error(500, "The server had an error while processing your request.", "server_error")
    n = body.get("n", 1)
    out: dict[str, Any] = {"created": CREATED, "data": [{"b64_json": PNG_1X1} for _ in range(n)],
                           "size": body.get("size", "1024x1024"), "quality": "low", "output_format": "png"}
    if "[nousage]" not in body["prompt"]:
        out["usage"] = {"input_tokens": 12, "output_tokens": 272 * n, "total_tokens": 12 + 272 * n,
                        "input_tokens_details": {"text_tokens": 12, "image_tokens": 0}}
    return web.Response(text=_dumps(out), content_type="application/json")


def make_app(log: list[dict[str, Any]] | None = None) -> web.Application:
    app = web.Application()
    app[LOG_KEY] = log if log is not None else []
    app[VIDEOS_KEY] = {}
    app.router.add_post("/v1/videos", create_video)
    app.router.add_get("/v1/videos/{video_id}", retrieve_video)
    app.router.add_get("/v1/videos/{video_id}/content", video_content)
    app.router.add_post("/v1/images/generations", images)
    return app
