"""Events passed to the ``track_event`` hook (frozen; observers must not mutate)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import attrs


@attrs.frozen(kw_only=True)
class CallFinished:
    """A billed request ended (successfully or not)."""

    request_id: str
    user_id: int
    key_id: str | None
    model: str
    upstream: str | None
    protocol: str
    streamed: bool
    status: str  # ok | error | incomplete | cancelled
    http_status: int
    usage: Any  # ir.Usage | None
    cost: Decimal | None
    latency_seconds: float
    ttft_seconds: float | None
    attempts: int
    type: str = "call_finished"


@attrs.frozen(kw_only=True)
class RequestRejected:
    """A request refused before any upstream call (auth, limits, validation)."""

    protocol: str
    http_status: int
    kind: str
    type: str = "request_rejected"


@attrs.frozen(kw_only=True)
class UpstreamFailed:
    """One upstream attempt failed (connection error, timeout, error status)."""

    upstream: str
    model: str
    kind: str  # errors kind: upstream_failed, upstream_timeout, rate_limited, ...
    upstream_status: int | None
    type: str = "upstream_failed"


@attrs.frozen(kw_only=True)
class UpstreamCooledDown:
    upstream: str
    type: str = "upstream_cooled_down"


@attrs.frozen(kw_only=True)
class BalanceChanged:
    user_id: int
    amount: Decimal
    kind: str
    type: str = "balance_changed"
