"""Every aiohttp AppKey in one place, named "cheapproxy.*"."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from .app import Proxy

PROXY_KEY: web.AppKey["Proxy"] = web.AppKey("cheapproxy.proxy", Any)  # type: ignore[arg-type]
REQUEST_ID_KEY: web.RequestKey[str] = web.RequestKey("cheapproxy.request_id", str)
