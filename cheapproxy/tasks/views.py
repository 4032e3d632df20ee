"""HTTP surface of async tasks (CONTRACT section 5).

* ``POST /v1/videos/generations`` (also ``/v1/video/generations`` and
  ``/video/v1/video/generations``), ``POST /v1/audios/generations``: submit a
  task; ``{"task_id": ..., "status": "queued", ...}``.
* ``POST /v1/images/generations``: synchronous image models answer at once
  in the OpenAI images shape; task-mode models return a task.
* ``GET /v1/tasks/{task_id}``: the task object; ``GET /v1/tasks``: the
  caller's recent tasks; ``GET /v1/tasks/{task_id}/content``: the output
  (a redirect, or streamed through when it needs the upstream credential).
* The OpenAI Videos API, for its SDK: ``POST /v1/videos``,
  ``GET /v1/videos/{video_id}``, ``GET /v1/videos/{video_id}/content``.

Errors use the OpenAI error shape.  A task id of another user is a 404,
exactly like an unknown id.
"""

from __future__ import annotations

from typing import Any, Callable

import aiohttp
import orjson
from aiohttp import web

from ..app_keys import PROXY_KEY, REQUEST_ID_KEY
from ..auth import authenticate, check_model
from ..errors import ProxyError
from ..pipeline import read_body
from ..storage.base import KeyRecord
from ..validate import parse_body
from . import images
from .base import TaskProvider
from .objects import public_state, task_json, video_json
from .service import TaskService

JSON = "application/json"
VIDEO_PATHS = ("/v1/videos/generations", "/v1/video/generations", "/video/v1/video/generations")
MAX_LIST = 100


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON, headers=headers)


def error_response(request: web.Request, err: ProxyError) -> web.Response:
    """The OpenAI error shape (through the openai-chat codec when installed)."""
    proto = request.app[PROXY_KEY].registry.protocols.get("openai-chat")
    if proto is not None:
        status, body = proto.encode_error(err)
    else:
        status = err.status
        body = orjson.dumps({"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}})
    headers = {"Retry-After": str(max(1, int(err.retry_after + 0.999)))} if err.retry_after is not None else None
    return web.Response(body=body, status=status, content_type=JSON, headers=headers)


def _base_url(request: web.Request) -> str:
    svc = TaskService.of(request.app[PROXY_KEY])
    return svc.config.public_base_url or str(request.url.origin())


def _handler(fn: Callable[..., Any]) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            return await fn(request)
        except ProxyError as err:
            return error_response(request, err)

    handler.__name__ = fn.__name__
    return handler


async def _key(request: web.Request) -> KeyRecord:
    return await authenticate(request, request.app[PROXY_KEY].keys)


async def _read_json(request: web.Request) -> tuple[dict[str, Any], int]:
    proxy = request.app[PROXY_KEY]
    raw = await read_body(request, proxy.config.server.max_body_bytes)
    return parse_body(raw), len(raw)


async def _read_form_or_json(request: web.Request) -> tuple[dict[str, Any], int]:
    """The OpenAI SDK sends ``videos.create`` as multipart/form-data."""
    if request.content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _read_json(request)
    limit = request.app[PROXY_KEY].config.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ProxyError("payload_too_large", f"Request body is larger than the limit of {limit} bytes.")
    try:
        form = await request.post()
    except web.HTTPRequestEntityTooLarge:
        raise ProxyError("payload_too_large", f"Request body is larger than the limit of {limit} bytes.") from None
    except ValueError:
        raise ProxyError("invalid_request", "The form body could not be parsed.") from None
    body: dict[str, Any] = {}
    for k, v in form.items():
        if not isinstance(v, str):
            raise ProxyError("invalid_request", f"File uploads ('{k}') are not supported here; pass a URL instead.", param=k)
        body[k] = v
    return body, request.content_length or 0


def _model(request: web.Request, body: dict[str, Any], key: KeyRecord) -> Any:
    proxy = request.app[PROXY_KEY]
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ProxyError("invalid_request", "Missing required field 'model' (a string).", param="model")
    model = proxy.catalog.resolve(name)
    if model is None:
        raise ProxyError("not_found", f"The model '{name[:200]}' does not exist or is not served here. GET /v1/models "
                         "lists the models.", param="model", code="model_not_found")
    check_model(key, model.name, stream=False)
    return model


def _check_kind(model: Any, kind: str, path: str) -> None:
    if model.config.kind != kind:
        raise ProxyError("invalid_request", f"Model '{model.name}' is a {model.config.kind} model; {path} takes "
                         f"{kind} models.", param="model")


async def _submit(request: web.Request, kind: str, *, body: dict[str, Any] | None = None) -> tuple[Any, Any]:
    proxy = request.app[PROXY_KEY]
    if proxy.draining:
        raise ProxyError("unavailable", "The gateway is shutting down; retry in a moment.", retry_after=1)
    if body is None:
        body, _ = await _read_json(request)
    key = await _key(request)
    model = _model(request, body, key)
    _check_kind(model, kind, request.path)
    await proxy.ratelimiter.admit(key)
    async with proxy.admission(key):
        task = await TaskService.of(proxy).submit(key=key, model=model, kind=kind, body=body)
    return task, model


@_handler
async def submit_video(request: web.Request) -> web.StreamResponse:
    task, _ = await _submit(request, "video")
    return _json(_submitted(task))


@_handler
async def submit_audio(request: web.Request) -> web.StreamResponse:
    task, _ = await _submit(request, "audio")
    return _json(_submitted(task))


def _submitted(task: Any) -> dict[str, Any]:
    return {"task_id": task.id, "id": task.id, "object": "task", "status": "queued", "kind": task.kind,
            "model": task.model, "created_at": int(task.created_at.timestamp()),
            "held": (task.request or {}).get("hold_usd")}


@_handler
async def submit_image(request: web.Request) -> web.StreamResponse:
    proxy = request.app[PROXY_KEY]
    if proxy.draining:
        raise ProxyError("unavailable", "The gateway is shutting down; retry in a moment.", retry_after=1)
    body, size = await _read_json(request)
    key = await _key(request)
    model = _model(request, body, key)
    _check_kind(model, "image", request.path)
    images.count(body)
    mode = images.image_mode(model)
    if mode == "task":
        await proxy.ratelimiter.admit(key)
        async with proxy.admission(key):
            task = await TaskService.of(proxy).submit(key=key, model=model, kind="image", body=body)
        return _json(_submitted(task))
    if mode is None:
        raise ProxyError("invalid_request", f"Model '{model.name}' cannot generate images.", param="model")
    await proxy.ratelimiter.admit(key)
    async with proxy.admission(key):
        out, cost = await images.generate(proxy, key=key, model=model, body=body, body_bytes=size,
                                          request_id=request[REQUEST_ID_KEY])
    return web.Response(body=out, content_type=JSON, headers={"x-cheapproxy-cost": str(cost)})


@_handler
async def get_task(request: web.Request) -> web.StreamResponse:
    key = await _key(request)
    svc = TaskService.of(request.app[PROXY_KEY])
    task = await svc.get_for(key, request.match_info["task_id"])
    return _json(task_json(task, base_url=_base_url(request)))


@_handler
async def list_tasks(request: web.Request) -> web.StreamResponse:
    key = await _key(request)
    proxy = request.app[PROXY_KEY]
    try:
        limit = max(1, min(int(request.query.get("limit", "20")), MAX_LIST))
    except ValueError:
        raise ProxyError("invalid_request", f"'limit' must be a whole number from 1 to {MAX_LIST}.", param="limit") from None
    tasks = await proxy.storage.list_tasks(user_id=key.user_id, limit=limit)
    base = _base_url(request)
    return _json({"object": "list", "data": [task_json(t, base_url=base) for t in tasks]})


async def _content(request: web.Request, task_id: str) -> web.StreamResponse:
    key = await _key(request)
    proxy = request.app[PROXY_KEY]
    task = await TaskService.of(proxy).get_for(key, task_id)
    if public_state(task.state) != "succeeded":
        raise ProxyError("invalid_request", f"Task '{task.id}' has no output (status: {public_state(task.state)}).",
                         param="task_id", code="task_not_ready")
    result = task.result or {}
    if not result.get("proxied"):
        urls = result.get("urls") or []
        try:
            index = int(request.query.get("index", "0"))
            if index < 0:
                raise IndexError(index)
            url = urls[index]
        except (ValueError, IndexError):
            raise ProxyError("not_found", f"Task '{task.id}' has {len(urls)} result(s).", param="index") from None
        return web.Response(status=302, headers={"Location": url})
    up = proxy.catalog.upstreams.get(task.upstream or "")
    if up is None or not isinstance(up.provider, TaskProvider) or task.provider_task_id is None:
        raise ProxyError("unavailable", "The upstream that made this output is no longer configured.")
    client = proxy.clients[up.name]
    try:
        resp = await up.provider.fetch_content(client.session, task.provider_task_id, request.query.get("variant"))
    except (aiohttp.ClientError, OSError, TimeoutError):
        raise ProxyError("upstream_failed", f"upstream {up.name!r} could not be reached for the content") from None
    try:
        if resp.status >= 400:
            raise ProxyError("upstream_failed" if resp.status >= 500 else "not_found",
                             f"upstream {up.name!r} returned HTTP {resp.status} for the content")
        out = web.StreamResponse(headers={"Content-Type": resp.headers.get("Content-Type", "application/octet-stream")})
        if resp.content_length is not None:
            out.content_length = resp.content_length
        await out.prepare(request)
        async for chunk in resp.content.iter_chunked(64 * 1024):
            await out.write(chunk)
        await out.write_eof()
        return out
    finally:
        resp.release()


@_handler
async def task_content(request: web.Request) -> web.StreamResponse:
    return await _content(request, request.match_info["task_id"])


# ---------------------------------------------------------------- OpenAI Videos API


@_handler
async def openai_create_video(request: web.Request) -> web.StreamResponse:
    body, _ = await _read_form_or_json(request)
    task, _ = await _submit(request, "video", body=body)
    return _json(video_json(task))


@_handler
async def openai_get_video(request: web.Request) -> web.StreamResponse:
    key = await _key(request)
    task = await TaskService.of(request.app[PROXY_KEY]).get_for(key, request.match_info["video_id"])
    return _json(video_json(task))


@_handler
async def openai_video_content(request: web.Request) -> web.StreamResponse:
    return await _content(request, request.match_info["video_id"])


def add_task_routes(add: Callable[[str, str, Callable[..., Any], str], None]) -> None:
    """Mount the task API (called from ``views.add_core_routes``)."""
    for path in VIDEO_PATHS:
        add("POST", path, submit_video, "core")
    add("POST", "/v1/audios/generations", submit_audio, "core")
    add("POST", "/v1/images/generations", submit_image, "core")
    add("GET", "/v1/tasks", list_tasks, "core")
    add("GET", "/v1/tasks/{task_id}", get_task, "core")
    add("GET", "/v1/tasks/{task_id}/content", task_content, "core")
    add("POST", "/v1/videos", openai_create_video, "core")
    add("GET", "/v1/videos/{video_id}", openai_get_video, "core")
    add("GET", "/v1/videos/{video_id}/content", openai_video_content, "core")

