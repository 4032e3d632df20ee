"""``cheapproxy serve`` with the request path cut down to one layer, for
``LAYERS=... bench/instructions.sh``: where a request's instructions go.

    python bench/layers.py LAYER --config cheapproxy.toml serve --port 14250

Layers, each adding one to the one before:

    core     auth, model routing, body rewrite, the upstream client, the relay;
             no stream tap, log line, admission, disconnect watcher, retry
             order or billing
    tap      + the stream tap (usage, end marker and errors read from the bytes)
    guards   + the log line, admission, the disconnect watcher, the retry order
    billing  + billing without its write: the lease hold, pricing, the usage
             record, CallFinished (Prometheus); the charge is dropped
    full     the gateway as shipped (+ the durable write: the charge queue's
             commit and its fold)

A measuring tool only: it replaces functions of cheapproxy in its own process
(nothing it serves is charged below ``full``).  It fails loudly when a function
it replaces is renamed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from decimal import Decimal
from typing import Any

from cheapproxy import leases, pipeline
from cheapproxy.app import Proxy

LAYERS = ("core", "tap", "guards", "billing", "full")


class NullTap:
    """A stream tap that reads nothing (the relay then ends at the upstream's EOF)."""

    usage = None
    complete = True
    ended = False
    output_seen = False
    error_message = None

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def close(self) -> bytes:
        return b""


def cut(layer: str) -> None:
    n = LAYERS.index(layer)
    for name in ("relay_stream", "_billed", "_log_call", "attempt_one", "dispatch"):
        assert hasattr(pipeline, name), f"cheapproxy.pipeline.{name} is gone: update bench/layers.py"
    assert hasattr(leases.LeaseBilling, "_queue") and hasattr(leases.LeaseBilling, "_committed")
    if n < LAYERS.index("tap"):
        relay_stream = pipeline.relay_stream

        async def untapped(proxy: Any, call: Any, request: Any, resp: Any, tap: Any, ctx: Any) -> Any:
            return await relay_stream(proxy, call, request, resp, NullTap(), ctx)

        pipeline.relay_stream = untapped
    if n < LAYERS.index("guards"):
        pipeline._log_call = lambda call: None
        Proxy.admission = lambda self, key: contextlib.nullcontext()  # type: ignore[assignment,method-assign]

        async def direct(proxy: Any, call: Any, request: Any, inbound: Any) -> Any:
            client = proxy.clients[call.model.upstreams[0].name]
            call.deadline = proxy.loop.time() + proxy.config.routing.deadline_seconds
            return await pipeline.attempt_one(proxy, call, request, inbound, client)

        pipeline._billed = direct
    elif n < LAYERS.index("billing"):
        async def unbilled(proxy: Any, call: Any, request: Any, inbound: Any) -> Any:
            return await pipeline.dispatch(proxy, call, request, inbound)

        pipeline._billed = unbilled
    elif n < LAYERS.index("full"):
        def dropped(self: Any, hold: Any, cost: Decimal, record: Any, after: Any) -> Any:
            # what the batch does once the charge has committed, without the commit
            fut = asyncio.get_running_loop().create_future()
            self._committed([leases._Pending(hold, cost, record, fut, after)], [(cost, Decimal(0))])
            return fut

        leases.LeaseBilling._queue = dropped  # type: ignore[method-assign]


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in LAYERS:
        sys.exit(f"usage: layers.py {{{'|'.join(LAYERS)}}} CHEAPPROXY-ARGS...")
    cut(sys.argv[1])
    from cheapproxy.cli import main as cli

    sys.argv = ["cheapproxy", *sys.argv[2:]]
    cli()


if __name__ == "__main__":
    main()
