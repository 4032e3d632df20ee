"""The ``GET /metrics`` handler."""

from __future__ import annotations

import structlog
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from cheapproxy.app_keys import PROXY_KEY

from .metrics import metrics_for

log = structlog.get_logger("cheapproxy.prometheus")


async def metrics_view(request: web.Request) -> web.Response:
    """Prometheus text format (OpenMetrics when the scraper asks for it).

    Not authenticated: scrapers usually carry no key, and the output holds no
    secret and no per-user data; operators bind or firewall it (README).
    """
    proxy = request.app[PROXY_KEY]
    metrics = metrics_for(proxy)
    holds: int | None
    try:
        holds = int(await proxy.storage.open_holds())
    except Exception as exc:  # noqa: BLE001 - a scrape must still answer when the database does not
        log.warning("metrics.open_holds_failed", error=type(exc).__name__)
        holds = None
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = metrics.render(encoder, holds)
    return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})
