"""Per-gateway Prometheus metrics: counters and histograms fed by events, plus
values read from the running Proxy at scrape time.

Every label value is bounded: model, upstream and protocol names are checked
against the gateway's own catalog and registry, HTTP codes against 100..599,
error kinds against ``cheapproxy.errors.KIND_STATUS``; anything else becomes
``other``.  No user name, user id, key id, request id or credential is ever a
label (docs/metrics.md).
"""

from __future__ import annotations

import time
import weakref
from decimal import Decimal
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

import cheapproxy
from cheapproxy.errors import KIND_STATUS

# Whole LLM calls run from tens of milliseconds (a cached short answer, an
# error) to minutes (long reasoning or a long stream): 0.05 s .. 300 s.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 240.0, 300.0)
# Time to first token: sub-second for most models, tens of seconds for
# reasoning models that think before the first byte.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)

STATUSES = frozenset({"ok", "error", "incomplete", "cancelled"})
TOKEN_TYPES = ("input", "output", "cache_read", "cache_write", "reasoning")
OTHER = "other"
NONE = "none"


def code_label(status: int | None) -> str:
    """An HTTP status as a label: the code itself, ``none`` or ``other``."""
    if status is None:
        return NONE
    if isinstance(status, int) and 100 <= status <= 599:
        return str(status)
    return OTHER


def kind_label(kind: str) -> str:
    return kind if kind in KIND_STATUS else OTHER


class Metrics:
    """The metrics of one gateway (one ``Proxy``), in its own registry so that
    several gateways in one process never share a counter."""

    def __init__(self, proxy: Any) -> None:
        self.registry = CollectorRegistry()
        self._proxy = weakref.ref(proxy)
        r = self.registry
        self.requests = Counter(
            "cheapproxy_requests", "Billed requests finished, by outcome (status) and HTTP code.",
            ["model", "upstream", "protocol", "streamed", "status", "code"], registry=r)
        self.rejected = Counter(
            "cheapproxy_requests_rejected", "Requests refused before any upstream call (auth, limits, validation).",
            ["protocol", "kind", "code"], registry=r)
        self.duration = Histogram(
            "cheapproxy_request_duration_seconds", "Billed request latency, from arrival to the last byte.",
            ["model", "upstream", "streamed", "status"], buckets=DURATION_BUCKETS, registry=r)
        self.ttft = Histogram(
            "cheapproxy_time_to_first_token_seconds", "Streamed requests: time from arrival to the first byte sent.",
            ["model", "upstream"], buckets=TTFT_BUCKETS, registry=r)
        self.tokens = Counter(
            "cheapproxy_tokens", "Tokens reported (or estimated when the upstream reported none); "
            "reasoning tokens are also counted in output.", ["model", "upstream", "type"], registry=r)
        self.failures = Counter(
            "cheapproxy_upstream_failures", "Failed upstream attempts (each retry or fallback attempt counts).",
            ["upstream", "model", "kind", "code"], registry=r)
        self.cooldowns = Counter(
            "cheapproxy_upstream_cooldowns", "Times an upstream was taken out of rotation by its circuit breaker.",
            ["upstream"], registry=r)
        # money is summed in Decimal and only turned into a float when exposed
        self.cost: dict[tuple[str, str], Decimal] = {}
        self._children: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self.open_holds: int | None = None
        r.register(_ScrapeCollector(self))
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        for name in proxy.clients:
            # known series start at 0 so that rate() sees the first increment
            self.cooldowns.labels(upstream=name)

    # ---- labels

    def _model(self, proxy: Any, name: str) -> str:
        return name if name in proxy.catalog.models else OTHER

    def _upstream(self, proxy: Any, name: str | None) -> str:
        if name is None:
            return NONE
        return name if name in proxy.clients else OTHER

    def _protocol(self, proxy: Any, name: str) -> str:
        return name if name in proxy.registry.protocols else OTHER

    # ---- events

    def observe(self, event: Any, proxy: Any) -> None:
        """Count one ``cheapproxy.events`` event."""
        handler = self._handlers.get(getattr(event, "type", ""))
        if handler is not None:
            handler(self, event, proxy)

    def _series(self, ev: Any, proxy: Any) -> tuple[Any, ...]:
        """The children one finished call updates, looked up once per label
        set (``labels()`` costs more than the increment; every label is
        bounded, so this cache is too)."""
        raw = (ev.model, ev.upstream, ev.protocol, ev.streamed, ev.status, ev.http_status)
        found = self._children.get(raw)
        if found is None:
            model, upstream = self._model(proxy, ev.model), self._upstream(proxy, ev.upstream)
            status = ev.status if ev.status in STATUSES else OTHER
            streamed = "true" if ev.streamed else "false"
            found = (
                self.requests.labels(model=model, upstream=upstream, protocol=self._protocol(proxy, ev.protocol),
                                     streamed=streamed, status=status, code=code_label(ev.http_status)),
                self.duration.labels(model=model, upstream=upstream, streamed=streamed, status=status),
                self.ttft.labels(model=model, upstream=upstream),
                tuple(self.tokens.labels(model=model, upstream=upstream, type=kind) for kind in TOKEN_TYPES),
                (model, upstream),
            )
            if len(self._children) < 10_000:  # names outside the catalog all map to "other"
                self._children[raw] = found
        return found

    def _call_finished(self, ev: Any, proxy: Any) -> None:
        requests, duration, ttft, tokens, cost_key = self._series(ev, proxy)
        requests.inc()
        duration.observe(max(0.0, ev.latency_seconds))
        if ev.ttft_seconds is not None:
            ttft.observe(max(0.0, ev.ttft_seconds))
        u = ev.usage
        if u is not None:
            counts = (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens, u.reasoning_tokens)
            for child, n in zip(tokens, counts):
                if n:
                    child.inc(max(0, n))
        if ev.cost is not None:
            self.cost[cost_key] = self.cost.get(cost_key, Decimal(0)) + Decimal(ev.cost)

    def _rejected(self, ev: Any, proxy: Any) -> None:
        self.rejected.labels(protocol=self._protocol(proxy, ev.protocol), kind=kind_label(ev.kind),
                             code=code_label(ev.http_status)).inc()

    def _upstream_failed(self, ev: Any, proxy: Any) -> None:
        self.failures.labels(upstream=self._upstream(proxy, ev.upstream), model=self._model(proxy, ev.model),
                             kind=kind_label(ev.kind), code=code_label(ev.upstream_status)).inc()

    def _cooled_down(self, ev: Any, proxy: Any) -> None:
        self.cooldowns.labels(upstream=self._upstream(proxy, ev.upstream)).inc()

    _handlers: dict[str, Callable[["Metrics", Any, Any], None]] = {
        "call_finished": _call_finished,
        "request_rejected": _rejected,
        "upstream_failed": _upstream_failed,
        "upstream_cooled_down": _cooled_down,
    }

    # ---- scrape

    def render(self, encoder: Callable[[CollectorRegistry], bytes], open_holds: int | None) -> bytes:
        """Encode the registry; ``open_holds`` was read from storage just before
        (collectors are synchronous, the storage is not)."""
        # no await between setting and encoding: concurrent scrapes cannot mix
        self.open_holds = open_holds
        return encoder(self.registry)


class _ScrapeCollector:
    """Values that live in the Proxy, read when Prometheus scrapes."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = weakref.ref(metrics)

    def collect(self) -> Iterator[Metric]:
        m = self._metrics()
        proxy = m._proxy() if m is not None else None
        if m is None or proxy is None:
            return
        cost = CounterMetricFamily("cheapproxy_cost_usd", "Money charged (USD), summed exactly and exposed as a float.",
                                   labels=["model", "upstream"])
        for (model, upstream), total in sorted(m.cost.items()):
            cost.add_metric([model, upstream], float(total))
        yield cost
        yield GaugeMetricFamily("cheapproxy_in_flight_requests", "Billed requests being served now.", value=proxy.inflight)
        up = m.open_holds is not None
        yield GaugeMetricFamily("cheapproxy_storage_up", "1 when the storage answered during this scrape.", value=1 if up else 0)
        if up:
            yield GaugeMetricFamily("cheapproxy_open_holds", "Balance holds not yet settled or released.", value=m.open_holds)
        now = time.monotonic()
        cooling = GaugeMetricFamily("cheapproxy_upstream_cooling_down", "1 while the upstream's circuit breaker keeps it out of rotation.",
                                    labels=["upstream"])
        remaining = GaugeMetricFamily("cheapproxy_upstream_cooldown_remaining_seconds", "Seconds until the upstream is tried again.",
                                      labels=["upstream"])
        for name in sorted(proxy.clients):
            left = max(0.0, proxy.clients[name].breaker.until - now)
            cooling.add_metric([name], 1 if left > 0 else 0)
            remaining.add_metric([name], round(left, 3))
        yield cooling
        yield remaining
        yield CounterMetricFamily("cheapproxy_events_dropped", "Events dropped because the observer queue was full.",
                                  value=proxy.dropped_events)
        info = GaugeMetricFamily("cheapproxy_build_info", "The running cheapproxy version.", labels=["version"])
        info.add_metric([cheapproxy.__version__], 1)
        yield info
        yield GaugeMetricFamily("cheapproxy_start_time_seconds", "Unix time the gateway started.", value=proxy.started_at)


_by_proxy: "weakref.WeakKeyDictionary[Any, Metrics]" = weakref.WeakKeyDictionary()


def metrics_for(proxy: Any) -> Metrics:
    """The Metrics of ``proxy``, created on first use (weakly keyed: a stopped
    gateway's metrics go away with it)."""
    m = _by_proxy.get(proxy)
    if m is None:
        m = _by_proxy[proxy] = Metrics(proxy)
    return m
