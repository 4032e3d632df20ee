"""The /metrics exposition for a fixed event sequence, byte for byte.

The golden files under ``tests/golden/`` were captured from the implementation
built on prometheus_client ``Counter``/``Histogram`` children; the plain
container implementation must render exactly the same text (Prometheus 0.0.4
and OpenMetrics).  Process-specific output is normalised: the ``process_*`` and
``python_*`` families are dropped and each ``*_created`` value is checked to be
a timestamp taken during the test, then replaced by ``<created>``.

To regenerate after an intended change of the output:
``CHEAPPROXY_WRITE_GOLDEN=1 pytest plugins/cheapproxy-prometheus/tests/test_exposition_golden.py``.
"""

from __future__ import annotations

import math
import os
import re
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

from prometheus_client.exposition import choose_encoder

from cheapproxy import __version__, ir
from cheapproxy.events import BalanceChanged, CallFinished, RequestRejected, UpstreamCooledDown, UpstreamFailed
from cheapproxy_prometheus.metrics import Metrics

GOLDEN = Path(__file__).parent / "golden"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


class _NS:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class FakeProxy:
    """Just what the plugin reads from a ``Proxy`` (weakly referenceable)."""

    def __init__(self) -> None:
        self.catalog = _NS(models={"m1": object(), "m2": object(), "demo": object()})
        # dict order matters: the cool-down series start at 0 in this order
        self.clients = {"up": _NS(breaker=_NS(until=0.0)), "demo": _NS(breaker=_NS(until=0.0)),
                        "alt": _NS(breaker=_NS(until=0.0))}
        self.registry = _NS(protocols={"openai-chat": object(), "anthropic-messages": object(), "gemini": object()})
        self.inflight = 3
        self.dropped_events = 2
        self.started_at = 1700000000.25


def call(model: str = "m1", upstream: str | None = "up", protocol: str = "openai-chat", streamed: bool = False,
         status: str = "ok", http_status: Any = 200, usage: Any = None, cost: Any = None,
         latency: Any = 0.3, ttft: Any = None) -> CallFinished:
    return CallFinished(request_id="req_x", user_id=7, key_id="key_x", model=model, upstream=upstream,
                        protocol=protocol, streamed=streamed, status=status, http_status=http_status, usage=usage,
                        cost=cost, latency_seconds=latency, ttft_seconds=ttft, attempts=1)


def usage(i: int = 0, o: int = 0, cr: int = 0, cw: int = 0, r: int = 0) -> ir.Usage:
    return ir.Usage(input_tokens=i, output_tokens=o, cache_read_tokens=cr, cache_write_tokens=cw, reasoning_tokens=r)


def event_sequence() -> list[Any]:
    """Deterministic: every label rule, bucket edge and accumulation quirk."""
    evs: list[Any] = []
    # plain successful calls; float sums that do not add up exactly (0.1 + 0.2 ...)
    for k in range(7):
        evs.append(call(latency=0.1 * (k + 1), usage=usage(10, 7, 5), cost=Decimal("0.000137")))
    # streams with a time to first token, on every bucket edge and beyond
    for x in (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0,
              120.0, 120.0001, 1e9, math.inf):
        evs.append(call(streamed=True, latency=x * 2, ttft=x, usage=usage(1, 2, 0, 3, 1), cost=Decimal("0.5")))
    # duration bucket edges, zero, negative, NaN, an int, just above an edge
    for x in (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0,
              240.0, 300.0, 300.5, 0.0, -1.0, math.nan, 3, 0.0500000001, -0.0):
        evs.append(call(model="m2", upstream="alt", protocol="gemini", status="error", http_status=502, latency=x))
    # negative ttft clamps to 0; usage None; cost None; reasoning only
    evs.append(call(model="demo", upstream="demo", protocol="anthropic-messages", streamed=True, ttft=-0.5,
                    latency=0.01, usage=usage(r=9)))
    evs.append(call(model="demo", upstream="demo", protocol="anthropic-messages", usage=None, cost=None))
    # negative and zero token counts are not counted
    evs.append(call(model="demo", upstream="demo", protocol="anthropic-messages", usage=usage(-5, 0, -1, 2, 0),
                    cost=Decimal("0")))
    # the other outcomes and codes
    for status, code in (("incomplete", 200), ("cancelled", 499), ("weird", 200), ("ok", None), ("ok", 9999),
                         ("ok", 99), ("ok", 100), ("ok", 599), ("ok", 600), ("ok", "200"), ("ok", True)):
        evs.append(call(status=status, http_status=code, latency=1.25, cost=Decimal("0.1")))
    # names outside the catalog: all "other", several raw names sharing one series
    evs.append(call(model="nope-1", upstream="nowhere", protocol="proto-x", usage=usage(3, 1), cost=Decimal("0.25")))
    evs.append(call(model="nope-2", upstream="nowhere-2", protocol="proto-y", usage=usage(3, 1), cost=Decimal("0.25")))
    # never reached an upstream
    evs.append(call(upstream=None, status="error", http_status=429, latency=0.001))
    # an exact Decimal total that floats would not give; many digits are rounded by the Decimal context
    for _ in range(3):
        evs.append(call(model="m2", upstream="up", cost=Decimal("0.1234567890123456789012345678901")))
    evs.append(call(model="m2", upstream="up", cost=Decimal("1E+2")))
    # the rarer events
    evs.append(RequestRejected(protocol="openai-chat", http_status=401, kind="authentication"))
    evs.append(RequestRejected(protocol="openai-chat", http_status=401, kind="authentication"))
    evs.append(RequestRejected(protocol="gemini", http_status=404, kind="not_found"))
    evs.append(RequestRejected(protocol="unknown-proto", http_status=418, kind="kind-canary"))
    evs.append(UpstreamFailed(upstream="up", model="m1", kind="upstream_failed", upstream_status=500))
    evs.append(UpstreamFailed(upstream="up", model="m1", kind="upstream_failed", upstream_status=500))
    evs.append(UpstreamFailed(upstream="demo", model="demo", kind="upstream_timeout", upstream_status=None))
    evs.append(UpstreamFailed(upstream="x", model="y", kind="z", upstream_status=1000))
    evs.append(UpstreamCooledDown(upstream="up"))
    evs.append(UpstreamCooledDown(upstream="nowhere"))
    evs.append(UpstreamCooledDown(upstream="up"))
    # ignored: another event type, an object without a type
    evs.append(BalanceChanged(user_id=1, amount=Decimal("5"), kind="topup"))
    evs.append(object())
    # more distinct raw label sets than the lookup cache holds (10 000): still one "other" series
    for i in range(10_010):
        evs.append(call(model=f"many-{i}", upstream="demo", protocol="gemini", latency=0.07, usage=usage(1)))
    # a label set first seen after everything else
    evs.append(call(model="m1", upstream="demo", protocol="openai-chat", latency=0.2))
    return evs


_CREATED = re.compile(r"^(\S+_created(?:\{[^}]*\})?) (\S+)$")


def normalise(text: str, t0: float, t1: float) -> str:
    out = []
    for line in text.splitlines(keepends=True):
        parts = line.split(" ", 3)
        name = parts[2] if line.startswith("# ") and len(parts) > 2 else line  # "# HELP name ...", "# EOF"
        if name.startswith(("process_", "python_")):
            continue
        m = _CREATED.match(line.rstrip("\n"))
        if m:
            assert t0 <= float(m.group(2)) <= t1, line
            line = m.group(1) + " <created>\n"
        out.append(line)
    return "".join(out)


def render(m: Metrics, accept: str, holds: int | None) -> str:
    encoder: Callable[..., bytes]
    encoder, _ = choose_encoder(accept)
    return m.render(encoder, holds).decode()


def check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("CHEAPPROXY_WRITE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_exposition_matches_golden_files() -> None:
    t0 = time.time()
    proxy = FakeProxy()
    m = Metrics(proxy)
    check("empty.prom", normalise(render(m, "", None), t0, time.time()))
    for ev in event_sequence():
        m.observe(ev, proxy)
    t1 = time.time()
    text = normalise(render(m, "", 5), t0, t1)
    assert f'cheapproxy_build_info{{version="{__version__}"}} 1.0\n' in text
    check("events.prom", text.replace(__version__, "<version>"))
    om = normalise(render(m, OPENMETRICS, 5), t0, t1)
    assert om.endswith("# EOF\n")
    check("events.openmetrics", om.replace(__version__, "<version>"))
    # scraping does not change anything
    assert normalise(render(m, "", 5), t0, time.time()).replace(__version__, "<version>") == text.replace(
        __version__, "<version>")


def test_created_timestamps_are_per_series_and_stable() -> None:
    proxy = FakeProxy()
    m = Metrics(proxy)
    t0 = time.time()
    m.observe(call(), proxy)
    t1 = time.time()
    time.sleep(0.01)
    m.observe(call(), proxy)
    m.observe(call(model="m2"), proxy)
    t2 = time.time()
    created: dict[str, float] = {}
    for line in render(m, "", None).splitlines():
        found = _CREATED.match(line)
        if found and found.group(1).startswith("cheapproxy_"):
            created[found.group(1)] = float(found.group(2))
    first = created['cheapproxy_requests_created{code="200",model="m1",protocol="openai-chat",status="ok",'
                    'streamed="false",upstream="up"}']
    second = created['cheapproxy_requests_created{code="200",model="m2",protocol="openai-chat",status="ok",'
                     'streamed="false",upstream="up"}']
    assert t0 <= first <= t1 < t1 + 0.01 <= second <= t2
    assert created['cheapproxy_request_duration_seconds_created{model="m1",status="ok",streamed="false",upstream="up"}'] <= t1
    assert created['cheapproxy_tokens_created{model="m1",type="reasoning",upstream="up"}'] <= t1
    # the cool-down series of the configured upstreams exist from the start
    assert created['cheapproxy_upstream_cooldowns_created{upstream="alt"}'] <= t0
