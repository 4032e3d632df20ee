"""``cheapproxy serve``: first-start bootstrap, the server loop, graceful drain
on SIGTERM/SIGINT, and ``--workers N`` processes sharing the port."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import signal
import sys
import time
from typing import Any

import attrs
import structlog
from aiohttp import web

from .app import make_app, open_storage
from .app_keys import PROXY_KEY
from .config import Config
from .logging import configure
from .registry import Registry

log = structlog.get_logger("cheapproxy.serve")

# after the grace period and the stream errors: how long aiohttp may take to
# close what is left (keep-alive connections, handlers that ignore the end)
CLOSE_SECONDS = 5.0


async def bootstrap(config: Config, registry: Registry) -> str | None:
    """On first start with an empty database: create a user and one key.
    Returns the message to print (the key is shown once), or None."""
    from .cli_keys import create_key

    storage = open_storage(config, registry)
    await storage.open()
    try:
        if await storage.count_users():
            return None
        s = config.server
        try:
            await storage.create_user(s.first_user, s.first_user_balance)
        except ValueError:
            return None  # another instance sharing the database bootstrapped first
        rec, secret = await create_key(storage, s.first_user, label="first key")
        return (
            f"First start: created user '{s.first_user}' with ${s.first_user_balance} and this API key "
            f"(shown once, keep it):\n\n    {secret}\n"
        )
    finally:
        await storage.close()


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def make_runner(app: web.Application, config: Config) -> web.AppRunner:
    """The AppRunner with the production settings (the gateway test fixture
    uses it too):

    * ``handler_cancellation=False``: a disconnect never cancels a handler in
      the middle of billing; the CallWatcher interrupts only the upstream wait;
    * ``keepalive_timeout = [server] header_timeout_seconds``: aiohttp starts
      this timer when a connection opens (and after each response) and does
      not restart it while header bytes trickle in, so it is the deadline for
      a complete request head (slowloris) as well as the idle keep-alive limit;
    * request line and each header at most 8190 bytes, at most 128 headers
      (aiohttp answers 400 beyond them)."""
    s = config.server
    return web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=CLOSE_SECONDS,
                         handler_cancellation=False, keepalive_timeout=s.header_timeout_seconds,
                         max_line_size=8190, max_field_size=8190, max_headers=128)


async def drain(proxy: Any, grace: float, again: asyncio.Event | None = None) -> None:
    """SIGTERM: /health reports draining and new requests get 503 at once;
    in-flight requests get ``grace`` seconds (a second signal cuts it short);
    then every request still running is interrupted (streams end with their
    protocol's error event)."""
    proxy.draining = True
    log.info("shutdown.draining", in_flight=proxy.inflight, grace_seconds=grace)
    deadline = time.monotonic() + grace
    while proxy.inflight and time.monotonic() < deadline and not (again is not None and again.is_set()):
        await asyncio.sleep(0.05)
    if proxy.inflight:
        log.warning("shutdown.ending_requests", in_flight=proxy.inflight)
    await proxy.end_streams()


GC_THRESHOLD = 20_000  # allocations between young-generation collections (CPython's default: 700)


async def serve_forever(config: Config, registry: Registry, host: str, port: int, *, reuse_port: bool = False,
                        announce: bool = True, workers: int = 1) -> None:
    """Serve until SIGTERM / SIGINT; ``workers``: how many processes of this
    ``serve`` share the port and the database (their rate limits are then counted
    in the database)."""
    app = make_app(config, registry, workers=workers)
    proxy = app[PROXY_KEY]
    grace = config.server.shutdown_grace_seconds
    runner = make_runner(app, config)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port, backlog=1024)
    await site.start()
    # everything loaded so far (modules, config, plugins) lives as long as the
    # process: keep it out of every future collection, and collect the young
    # generation less often (request objects are freed by reference counting;
    # a collection walks every tracked object, a cost paid on the hot path)
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 50)
    if announce:
        print(f"cheapproxy listening on http://{host}:{port}  (models: {', '.join(proxy.catalog.models)})", flush=True)
    stop, again = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def signalled() -> None:
        (again if stop.is_set() else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled)
    await stop.wait()
    await drain(proxy, grace, again)
    await runner.cleanup()  # stops listening, closes connections, runs the app cleanup (settlements flushed)
    log.info("shutdown.done")


def _worker(config: Config, host: str, port: int, workers: int) -> None:
    from .registry import build_registry

    _use_uvloop()
    configure(config.server.log_level, config.server.log_format)
    registry = build_registry(disable=config.plugins.disable)
    asyncio.run(serve_forever(config, registry, host, port, reuse_port=True, announce=False, workers=workers))


def run(config: Config, registry: Registry, *, host: str | None, port: int | None, workers: int = 1) -> None:
    configure(config.server.log_level, config.server.log_format)
    host = host or config.server.host
    port = port or config.server.port
    msg = asyncio.run(bootstrap(config, registry))
    if msg:
        print(msg, flush=True)
    if workers <= 1:
        _use_uvloop()
        asyncio.run(serve_forever(config, registry, host, port))
        return
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(config, host, port, workers), daemon=False) for _ in range(workers)]
    for p in procs:
        p.start()
    print(f"cheapproxy listening on http://{host}:{port} with {workers} workers", flush=True)

    def forward(signum: int, _frame: Any) -> None:
        for p in procs:
            if p.pid:
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    for p in procs:
        p.join()
        code = code or (p.exitcode or 0)
    sys.exit(code)


__all__ = ["run", "serve_forever", "bootstrap", "make_runner", "drain", "attrs"]
