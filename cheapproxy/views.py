"""Core routes that are not a protocol: root, health, model lists, transfer."""

from __future__ import annotations

import datetime as dt
from typing import Any, Callable

import orjson
from aiohttp import web

from . import __version__
from .app_keys import PROXY_KEY
from .auth import authenticate, model_allowed
from .errors import ProxyError
from .pipeline import read_body
from .transfer import do_transfer
from .validate import parse_body

JSON = "application/json"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON)


def _error(request: web.Request, proto_name: str, err: ProxyError) -> web.Response:
    proto = request.app[PROXY_KEY].registry.protocols.get(proto_name)
    if proto is None:
        status, body = err.status, orjson.dumps({"error": {"message": err.message, "type": err.kind}})
    else:
        status, body = proto.encode_error(err)
    headers = {"Retry-After": str(int(err.retry_after))} if err.retry_after else None
    return web.Response(body=body, status=status, content_type=JSON, headers=headers)


async def root(request: web.Request) -> web.Response:
    if request.method == "HEAD":
        return web.Response(status=200, content_type=JSON)
    return _json({"name": "cheapproxy", "version": __version__, "docs": "https://github.com/cheapproxy/cheapproxy"})


async def health(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    try:
        db_ok = await proxy.storage.ping()
    except Exception:  # noqa: BLE001 - health reports, never raises
        db_ok = False
    if proxy.draining:
        return _json({"status": "draining", "database": "ok" if db_ok else "unavailable"}, status=503)
    return _json({"status": "ok" if db_ok else "degraded", "database": "ok" if db_ok else "unavailable",
                  "version": __version__}, status=200 if db_ok else 503)


def _visible_models(request: web.Request, key: Any) -> list[Any]:
    proxy = request.app[PROXY_KEY]
    return [m for m in proxy.catalog.models.values() if model_allowed(key, [m.name])]


async def list_models(request: web.Request) -> web.Response:
    anthropic = "anthropic-version" in request.headers
    proto = "anthropic-messages" if anthropic else "openai-chat"
    proxy = request.app[PROXY_KEY]
    try:
        key = await authenticate(request, proxy.keys)
    except ProxyError as err:
        return _error(request, proto, err)
    models = _visible_models(request, key)
    created = int(proxy.started_at)
    if anthropic:
        iso = dt.datetime.fromtimestamp(created, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        data = [{"type": "model", "id": m.name, "display_name": m.config.description or m.name, "created_at": iso,
                 "max_tokens": m.config.max_output_tokens, "max_input_tokens": m.config.context_window} for m in models]
        return _json({"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                      "last_id": data[-1]["id"] if data else None})
    data = [{"id": m.name, "object": "model", "created": created, "owned_by": "cheapproxy"} for m in models]
    return _json({"object": "list", "data": data})


async def list_models_gemini(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    try:
        key = await authenticate(request, proxy.keys)
    except ProxyError as err:
        return _error(request, "gemini", err)
    out = []
    for m in _visible_models(request, key):
        if m.config.kind == "embedding":
            methods = ["embedContent"]
        elif m.config.kind == "chat":
            methods = ["generateContent", "streamGenerateContent", "countTokens"]
        else:
            continue
        out.append({"name": f"models/{m.name}", "version": "1", "displayName": m.config.description or m.name,
                    "inputTokenLimit": m.config.context_window, "outputTokenLimit": m.config.max_output_tokens,
                    "supportedGenerationMethods": methods})
    return _json({"models": out})


async def models_info(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    try:
        key = await authenticate(request, proxy.keys)
    except ProxyError as err:
        return _error(request, "openai-chat", err)
    data = []
    for m in _visible_models(request, key):
        price = m.scheme.describe() if hasattr(m.scheme, "describe") else {}
        data.append({
            "id": m.name, "aliases": list(m.config.aliases), "kind": m.config.kind,
            "upstreams": [u.name for u in m.upstreams], "max_output_tokens": m.config.max_output_tokens,
            "context_window": m.config.context_window, "price": {"scheme": m.config.price.scheme, **price},
        })
    return _json({"object": "list", "data": data})


async def transfer(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    try:
        key = await authenticate(request, proxy.keys)
    except ProxyError:
        return _json({"success": False, "error": "Unauthorized"}, status=401)
    try:
        raw = await read_body(request, proxy.config.server.max_body_bytes)
        body = parse_body(raw)
    except ProxyError as err:
        return _json({"success": False, "error": err.message}, status=err.status)
    sender = await proxy.storage.get_user_by_id(key.user_id)
    if sender is None:
        return _json({"success": False, "error": "Unauthorized"}, status=401)
    status, payload = await do_transfer(proxy.storage, sender=sender, body=body,
                                        idempotency_key=request.headers.get("Idempotency-Key"), emit=proxy.emit)
    return _json(payload, status=status)


def add_core_routes(add: Callable[[str, str, Callable[..., Any], str], None]) -> None:
    add("GET", "/", root, "core")
    add("HEAD", "/", root, "core")
    add("GET", "/health", health, "core")
    add("GET", "/v1/models", list_models, "core")
    add("GET", "/models", list_models, "core")
    add("GET", "/v1beta/models", list_models_gemini, "core")
    add("GET", "/v1/models/info", models_info, "core")
    add("POST", "/api/user/transfer", transfer, "core")
    from .tasks.views import add_task_routes

    add_task_routes(add)  # async video / image / audio tasks
