"""Micro-benchmark: CPU cost of counting one ``CallFinished`` event.

    taskset -c 1 /work/venv/bin/python plugins/cheapproxy-prometheus/bench_observe.py

Times ``Metrics.observe`` (and the whole ``track_event`` hookimpl, which also
finds the gateway's Metrics) for a typical non-streamed call and a streamed
call with a time to first token, usage and a cost: 100 000 events per run,
best of 5 runs, in µs per event.  ``--module PATH`` benchmarks another copy of
``metrics.py`` instead (e.g. the previous implementation, to compare).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from decimal import Decimal
from typing import Any, Callable

from cheapproxy import ir
from cheapproxy.events import CallFinished

N = 100_000
RUNS = 5


class _NS:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class FakeProxy:
    """What the plugin reads from a ``Proxy``."""

    def __init__(self) -> None:
        self.catalog = _NS(models={"gpt-4o": 1, "claude-sonnet": 1})
        self.clients = {"openai": _NS(breaker=_NS(until=0.0)), "anthropic": _NS(breaker=_NS(until=0.0))}
        self.registry = _NS(protocols={"openai-chat": 1, "anthropic-messages": 1})
        self.inflight = 0
        self.dropped_events = 0
        self.started_at = time.time()


def events() -> dict[str, CallFinished]:
    common = dict(request_id="req_0123456789", user_id=42, key_id="key_abc", attempts=1, status="ok", http_status=200)
    return {
        "non-stream": CallFinished(model="gpt-4o", upstream="openai", protocol="openai-chat", streamed=False,
                                   usage=ir.Usage(input_tokens=812, output_tokens=230, cache_read_tokens=1024),
                                   cost=Decimal("0.004561"), latency_seconds=0.8421, ttft_seconds=None, **common),
        "stream": CallFinished(model="claude-sonnet", upstream="anthropic", protocol="anthropic-messages",
                               streamed=True, usage=ir.Usage(input_tokens=1500, output_tokens=640, cache_read_tokens=300,
                                                             cache_write_tokens=200, reasoning_tokens=120),
                               cost=Decimal("0.013347"), latency_seconds=6.31, ttft_seconds=0.412, **common),
    }


def best_us(fn: Callable[[Any, Any], Any], ev: Any, proxy: Any) -> float:
    best = float("inf")
    loop = range(N)
    for _ in range(RUNS):
        t = time.perf_counter()
        for _ in loop:
            fn(ev, proxy)
        best = min(best, time.perf_counter() - t)
    return best / N * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--module", help="path of a metrics.py to benchmark instead of the installed one")
    args = ap.parse_args()
    if args.module:
        spec = importlib.util.spec_from_file_location("bench_metrics", args.module)
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_metrics"] = mod
        spec.loader.exec_module(mod)
    else:
        from cheapproxy_prometheus import metrics as mod
    proxy = FakeProxy()
    m = mod.metrics_for(proxy)

    def track_event(event: Any, proxy: Any) -> None:  # what cheapproxy_prometheus.track_event does
        mod.metrics_for(proxy).observe(event, proxy)

    if not args.module:
        import cheapproxy_prometheus

        track_event = cheapproxy_prometheus.track_event  # noqa: F811 - the real hookimpl

    def noop(event: Any, proxy: Any) -> None:
        pass

    print(f"{'':12} {'observe':>10} {'track_event':>12}   (µs/event, best of {RUNS} x {N})")
    for name, ev in events().items():
        print(f"{name:12} {best_us(m.observe, ev, proxy):10.3f} {best_us(track_event, ev, proxy):12.3f}")
    print(f"{'(empty call)':12} {best_us(noop, None, proxy):10.3f}")


if __name__ == "__main__":
    main()
