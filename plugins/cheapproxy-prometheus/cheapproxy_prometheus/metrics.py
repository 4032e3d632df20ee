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
from bisect import bisect_left
from decimal import Decimal
from typing import Any, Callable, Iterator, Sequence

import prometheus_client.metrics
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric, Sample
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

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

_INF = float("inf")
# upper bounds as prometheus_client's Histogram keeps them (+Inf last); the
# bucket of an observation is the first bound >= it, i.e. bisect_left
_DURATION_BOUNDS = [float(b) for b in DURATION_BUCKETS] + [_INF]
_TTFT_BOUNDS = [float(b) for b in TTFT_BUCKETS] + [_INF]
_ZERO = Decimal(0)


def code_label(status: int | None) -> str:
    """An HTTP status as a label: the code itself, ``none`` or ``other``."""
    if status is None:
        return NONE
    if isinstance(status, int) and 100 <= status <= 599:
        return str(status)
    return OTHER


def kind_label(kind: str) -> str:
    return kind if kind in KIND_STATUS else OTHER


# ---------------------------------------------------------------- plain series
#
# The event-fed counters and histograms are plain lists in dicts, updated with
# plain arithmetic, and turned into metric families only when Prometheus
# scrapes.  prometheus_client's Counter/Histogram children take a lock and run
# checks on every inc()/observe(), several times per request; none of it is
# needed here.  No lock: events are counted by the gateway's dispatcher task
# and /metrics renders synchronously (no await inside render()), both on the
# one event loop thread, so an update and a scrape never interleave.
#
# The output is what prometheus_client's Counter and Histogram give for the
# same observations, byte for byte: the same families in the same order, one
# series per label set in first-seen order, the same float sums (added in the
# same order; counts are ints, equal to prometheus_client's float counts below
# 2**53), and a ``_created`` sample (time.time() when the series was first
# seen) unless prometheus_client's created series are turned off
# (PROMETHEUS_DISABLE_CREATED_SERIES, disable_created_metrics()).


def _use_created() -> bool:
    return bool(getattr(prometheus_client.metrics, "_use_created", True))


class _Counter:
    """A labelled counter: label values -> ``[count]``.  With ``split``, the
    last label takes these values and a row holds one count for each (the
    token types of one model and upstream are one list)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 split: tuple[str, ...] | None = None) -> None:
        self.name, self.documentation, self.labelnames, self.split = name, documentation, tuple(labelnames), split
        self.rows: dict[tuple[str, ...], list[Any]] = {}
        self.created: dict[tuple[str, ...], float] = {}

    def row(self, labels: tuple[str, ...]) -> list[Any]:
        """The row of these label values, created at 0 on first use."""
        row = self.rows.get(labels)
        if row is None:
            row = self.rows[labels] = [0] * (len(self.split) if self.split else 1)
            self.created[labels] = time.time()
        return row

    def collect(self, use_created: bool) -> Metric:
        fam = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, row in self.rows.items():
            created = self.created[labels] if use_created else None
            if self.split is None:
                fam.add_metric(labels, float(row[0]), created)
            else:
                for value, n in zip(self.split, row):
                    fam.add_metric(labels + (value,), float(n), created)
        return fam


class _Histogram:
    """A labelled histogram: label values -> ``[n per bucket ..., sum]``
    (per-bucket counts, made cumulative when scraped)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], bounds: list[float]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.les = [floatToGoString(b) for b in bounds]
        self.rows: dict[tuple[str, ...], list[Any]] = {}
        self.created: dict[tuple[str, ...], float] = {}

    def row(self, labels: tuple[str, ...]) -> list[Any]:
        row = self.rows.get(labels)
        if row is None:
            row = self.rows[labels] = [0] * len(self.les) + [0.0]
            self.created[labels] = time.time()
        return row

    def collect(self, use_created: bool) -> Metric:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, row in self.rows.items():
            acc = 0.0
            buckets = []
            for le, n in zip(self.les, row):
                acc += n
                buckets.append((le, acc))
            fam.add_metric(labels, buckets, row[-1])  # the buckets, _count, _sum
            if use_created:
                fam.samples.append(Sample(self.name + "_created", dict(zip(self.labelnames, labels)), self.created[labels]))
        return fam


class _EventCollector:
    """The event-fed families, in the order of the output (the order in which
    prometheus_client metrics were registered when each was its own collector)."""

    def __init__(self, families: tuple[_Counter | _Histogram, ...]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        use_created = _use_created()
        for family in self._families:
            yield family.collect(use_created)


class Metrics:
    """The metrics of one gateway (one ``Proxy``), in its own registry so that
    several gateways in one process never share a counter."""

    def __init__(self, proxy: Any) -> None:
        self.registry = CollectorRegistry()
        self._proxy = weakref.ref(proxy)
        r = self.registry
        self.requests = _Counter(
            "cheapproxy_requests", "Billed requests finished, by outcome (status) and HTTP code.",
            ["model", "upstream", "protocol", "streamed", "status", "code"])
        self.rejected = _Counter(
            "cheapproxy_requests_rejected", "Requests refused before any upstream call (auth, limits, validation).",
            ["protocol", "kind", "code"])
        self.duration = _Histogram(
            "cheapproxy_request_duration_seconds", "Billed request latency, from arrival to the last byte.",
            ["model", "upstream", "streamed", "status"], _DURATION_BOUNDS)
        self.ttft = _Histogram(
            "cheapproxy_time_to_first_token_seconds", "Streamed requests: time from arrival to the first byte sent.",
            ["model", "upstream"], _TTFT_BOUNDS)
        self.tokens = _Counter(
            "cheapproxy_tokens", "Tokens reported (or estimated when the upstream reported none); "
            "reasoning tokens are also counted in output.", ["model", "upstream", "type"], split=TOKEN_TYPES)
        self.failures = _Counter(
            "cheapproxy_upstream_failures", "Failed upstream attempts (each retry or fallback attempt counts).",
            ["upstream", "model", "kind", "code"])
        self.cooldowns = _Counter(
            "cheapproxy_upstream_cooldowns", "Times an upstream was taken out of rotation by its circuit breaker.",
            ["upstream"])
        # money is summed in Decimal and only turned into a float when exposed:
        # (model, upstream) -> [total], [None] until the first charge
        self.cost: dict[tuple[str, str], list[Decimal | None]] = {}
        # raw CallFinished labels -> the rows that call updates
        self._calls: dict[tuple[Any, ...], tuple[list[Any], ...]] = {}
        self.open_holds: int | None = None
        r.register(_EventCollector((self.requests, self.rejected, self.duration, self.ttft, self.tokens,
                                    self.failures, self.cooldowns)))
        r.register(_ScrapeCollector(self))
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        for name in proxy.clients:
            # known series start at 0 so that rate() sees the first increment
            self.cooldowns.row((name,))

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
        kind = getattr(event, "type", "")
        if kind == "call_finished":  # the hot one, without the table lookup
            self._call_finished(event, proxy)
            return
        handler = self._handlers.get(kind)
        if handler is not None:
            handler(self, event, proxy)

    def _call_series(self, ev: Any, proxy: Any) -> tuple[list[Any], ...]:
        """The rows one finished call updates, looked up once per raw label
        set (every label is bounded, so this cache is too)."""
        model, upstream = self._model(proxy, ev.model), self._upstream(proxy, ev.upstream)
        status = ev.status if ev.status in STATUSES else OTHER
        streamed = "true" if ev.streamed else "false"
        found = (
            self.requests.row((model, upstream, self._protocol(proxy, ev.protocol), streamed, status,
                               code_label(ev.http_status))),
            self.duration.row((model, upstream, streamed, status)),
            self.ttft.row((model, upstream)),
            self.tokens.row((model, upstream)),
            self.cost.setdefault((model, upstream), [None]),
        )
        if len(self._calls) < 10_000:  # names outside the catalog all map to "other"
            self._calls[(ev.model, ev.upstream, ev.protocol, ev.streamed, ev.status, ev.http_status)] = found
        return found

    def _call_finished(self, ev: Any, proxy: Any) -> None:
        # the hot path (once per billed request): plain list arithmetic only
        found = self._calls.get((ev.model, ev.upstream, ev.protocol, ev.streamed, ev.status, ev.http_status))
        if found is None:
            found = self._call_series(ev, proxy)
        requests, duration, ttft, tokens, cost = found
        requests[0] += 1
        x = ev.latency_seconds
        if not x > 0.0:  # max(0.0, x): negative, zero and NaN count as 0.0
            x = 0.0
        duration[bisect_left(_DURATION_BOUNDS, x)] += 1
        duration[-1] += x
        x = ev.ttft_seconds
        if x is not None:
            if not x > 0.0:
                x = 0.0
            ttft[bisect_left(_TTFT_BOUNDS, x)] += 1
            ttft[-1] += x
        u = ev.usage
        if u is not None:
            # TOKEN_TYPES order; zero, negative and missing counts add nothing
            n = u.input_tokens
            if n and n > 0:
                tokens[0] += n
            n = u.output_tokens
            if n and n > 0:
                tokens[1] += n
            n = u.cache_read_tokens
            if n and n > 0:
                tokens[2] += n
            n = u.cache_write_tokens
            if n and n > 0:
                tokens[3] += n
            n = u.reasoning_tokens
            if n and n > 0:
                tokens[4] += n
        c = ev.cost
        if c is not None:
            if c.__class__ is not Decimal:  # Decimal(c) is c for a Decimal
                c = Decimal(c)
            total = cost[0]
            cost[0] = (_ZERO if total is None else total) + c

    def _rejected(self, ev: Any, proxy: Any) -> None:
        self.rejected.row((self._protocol(proxy, ev.protocol), kind_label(ev.kind), code_label(ev.http_status)))[0] += 1

    def _upstream_failed(self, ev: Any, proxy: Any) -> None:
        self.failures.row((self._upstream(proxy, ev.upstream), self._model(proxy, ev.model), kind_label(ev.kind),
                           code_label(ev.upstream_status)))[0] += 1

    def _cooled_down(self, ev: Any, proxy: Any) -> None:
        self.cooldowns.row((self._upstream(proxy, ev.upstream),))[0] += 1

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
        for key in sorted(m.cost):
            total = m.cost[key][0]
            if total is not None:  # a series appears with the first charge
                cost.add_metric(list(key), float(total))
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
# the last (proxy, Metrics) found, both weakly: a process usually runs one
# gateway, and this skips the WeakKeyDictionary lookup on every event
_last: "tuple[weakref.ref[Any], weakref.ref[Metrics]] | None" = None


def metrics_for(proxy: Any) -> Metrics:
    """The Metrics of ``proxy``, created on first use (weakly keyed: a stopped
    gateway's metrics go away with it)."""
    global _last
    last = _last
    if last is not None and last[0]() is proxy:
        m = last[1]()
        if m is not None:  # always, while the proxy lives (_by_proxy holds it)
            return m
    m = _by_proxy.get(proxy)
    if m is None:
        m = _by_proxy[proxy] = Metrics(proxy)
    _last = (weakref.ref(proxy), weakref.ref(m))
    return m
