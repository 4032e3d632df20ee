"""cheapproxy-prometheus: ``GET /metrics`` in the Prometheus text format, fed
by the ``track_event`` hook (see docs/metrics.md for every metric)."""

from __future__ import annotations

from typing import Any, Callable

from cheapproxy import hookimpl

from .metrics import metrics_for
from .view import metrics_view


@hookimpl
def track_event(event: Any, proxy: Any) -> None:
    # the registry is per gateway (several can run in one process), created on
    # first use by the first event or scrape
    metrics_for(proxy).observe(event, proxy)


@hookimpl
def register_routes(register: Callable[..., None]) -> None:
    register("GET", "/metrics", metrics_view)
