"""Application assembly: ``make_app(config, registry)`` is the only place the
parts are put together."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import secrets
import time
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from . import __version__, pipeline
from .app_keys import PROXY_KEY, REQUEST_ID_KEY
from .auth import KeyCache
from .leases import LeaseBilling
from .catalog import Catalog, build_catalog, with_defaults
from .config import Config
from .errors import ConfigError, ProxyError
from .events import UpstreamCooledDown
from .logging import add_secret
from .ratelimit import RateLimiter, SharedRateLimiter
from .registry import Registry
from .upstream import Breaker, UpstreamClient
from .watch import CallWatcher

log = structlog.get_logger("cheapproxy.app")


def open_storage(config: Config, registry: Registry) -> Any:
    url = config.server.database
    scheme = urlsplit(url).scheme.split("+")[0]
    factory = registry.storage_backends.get(scheme)
    if factory is None:
        known = ", ".join(sorted(registry.storage_backends)) or "none"
        raise ConfigError(f"no storage backend for {scheme!r} URLs (installed: {known})", file=config.path, table="server", key="database")
    return factory(url, config.base_dir)


def _shared_limits(config: Config, storage: Any, workers: int) -> bool:
    """Count rpm / tpm in the database ([server] rate_limits)?  A storage
    backend without the rate methods (one written before them) counts in
    memory under "auto", and is refused under "database"."""
    if not config.server.shared_rate_limits(workers):
        return False
    if hasattr(storage, "rate_take"):
        return True
    if config.server.rate_limits == "database":
        raise ConfigError(f"rate_limits = \"database\" needs a storage backend with rate_take(); {type(storage).__name__} "
                          "has none", file=config.path, table="server", key="rate_limits")
    log.warning("ratelimit.per_process", storage=type(storage).__name__,
                reason="the storage backend cannot count rate limits; each process counts its own")
    return False


class Proxy:
    """The running gateway's state (stored on the app under PROXY_KEY)."""

    def __init__(self, config: Config, registry: Registry, catalog: Catalog, storage: Any, *, workers: int = 1) -> None:
        self.config = config
        self.registry = registry
        self.catalog = catalog
        self.storage = storage
        self.billing = LeaseBilling(storage)
        self.keys = KeyCache(storage, refresh_seconds=config.server.key_cache_seconds)
        self.ratelimiter: RateLimiter | SharedRateLimiter = (
            SharedRateLimiter(storage, self.track) if _shared_limits(config, storage, workers) else RateLimiter())
        r = config.routing
        self.clients = {
            name: UpstreamClient(u, Breaker(r.cooldown_after_failures, r.cooldown_base_seconds, r.cooldown_max_seconds), r)
            for name, u in catalog.upstreams.items()
        }
        for u in catalog.upstreams.values():
            add_secret(u.config.api_key)
        self.draining = False
        self.inflight = 0
        self.inflight_by_key: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._events: asyncio.Queue[Any] = asyncio.Queue(maxsize=10000)
        self.dropped_events = 0
        self.streams: set[Any] = set()
        # interrupts handlers waiting on an upstream when their client left (or at shutdown)
        self.watcher = CallWatcher(config.server.disconnect_check_seconds)
        self.started_at = time.time()
        self.loop: asyncio.AbstractEventLoop | None = None  # the serving loop, set at startup
        # plugins register at start only: no observer means no event queue work
        self.observed = bool(registry.pm.hook.track_event.get_hookimpls())

    def estimate_input_tokens(self, body_bytes: int) -> int:
        """Prompt tokens assumed for a hold (see docs/billing.md)."""
        return self.billing.estimate_input_tokens(body_bytes, self.config.billing.prompt_bytes_per_token)

    async def sweep_forever(self) -> None:
        """Release holds that outlived [billing] hold_ttl_seconds (a settlement
        that failed, a crashed process) and prune old idempotency records."""
        import datetime as dt

        b = self.config.billing
        while True:
            try:
                released = await self.billing.release_stale(b.hold_ttl_seconds)
                if released:
                    log.warning("billing.stale_holds_released", count=released)
                await self.storage.prune_idempotency(dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=24))
                if isinstance(self.ratelimiter, SharedRateLimiter):
                    await self.ratelimiter.prune()
            except Exception:  # noqa: BLE001 - retried next round
                log.exception("billing.sweep_failed")
            await asyncio.sleep(b.sweep_interval_seconds)

    # ---- background work

    def track(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` on a task the app waits for at shutdown."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait_idle(self) -> None:
        """Wait until every tracked task (settlements) finished (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.billing.flush()

    def emit(self, event: Any) -> None:
        if not self.observed:
            return
        try:
            self._events.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped_events += 1

    def emit_cooldown(self, upstream: str) -> None:
        self.emit(UpstreamCooledDown(upstream=upstream))

    async def _dispatch_events(self) -> None:
        hook = self.registry.pm.hook.track_event
        while True:
            event = await self._events.get()
            try:
                for res in hook(event=event, proxy=self):
                    if asyncio.iscoroutine(res):
                        await res
            except Exception:  # noqa: BLE001 - an observer must not break the gateway
                log.exception("plugin.track_event_failed")
            finally:
                self._events.task_done()

    # ---- admission

    def admission(self, key: Any) -> "_Admission":
        """``with`` (or ``async with``) around a billed request: counts it
        against ``max_in_flight`` and ``max_in_flight_per_key`` or refuses it.
        A plain object, not a generator: it runs on every request."""
        return _Admission(self, key.id)

    def register_stream(self, upstream_response: Any) -> Any:
        """Remember an open upstream stream so shutdown can end it."""
        self.streams.add(upstream_response)
        return upstream_response

    async def end_streams(self) -> None:
        """After the grace period: interrupt every request still being served;
        a stream gets its protocol's in-stream error event and ends, a request
        still waiting for its first byte gets a 503.  Upstream streams left
        over are closed."""
        self.watcher.interrupt_all()
        await asyncio.sleep(0)  # let the interrupted handlers write their error events
        for resp in list(self.streams):
            resp.close()
        deadline = time.monotonic() + 5
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def weighted_order(self, clients: list[UpstreamClient]) -> list[UpstreamClient]:
        """Weighted random order (load spreading); the rest stay as fallbacks."""
        pool = list(clients)
        out: list[UpstreamClient] = []
        while pool:
            pick = random.choices(pool, weights=[max(0, c.upstream.config.weight) or 0.0001 for c in pool])[0]
            out.append(pick)
            pool.remove(pick)
        return out


class _Admission:
    __slots__ = ("proxy", "key_id")

    def __init__(self, proxy: Proxy, key_id: str) -> None:
        self.proxy, self.key_id = proxy, key_id

    def __enter__(self) -> None:
        proxy, key_id = self.proxy, self.key_id
        s = proxy.config.server
        if proxy.inflight >= s.max_in_flight:
            raise ProxyError("overloaded", "The gateway is at capacity; retry shortly.", retry_after=1)
        n = proxy.inflight_by_key.get(key_id, 0)
        if n >= s.max_in_flight_per_key:
            raise ProxyError("rate_limited", f"Too many concurrent requests for this key (limit {s.max_in_flight_per_key}).", retry_after=1)
        proxy.inflight += 1
        proxy.inflight_by_key[key_id] = n + 1

    def __exit__(self, *_: Any) -> None:
        proxy, key_id = self.proxy, self.key_id
        proxy.inflight -= 1
        left = proxy.inflight_by_key[key_id] - 1
        if left:
            proxy.inflight_by_key[key_id] = left
        else:
            del proxy.inflight_by_key[key_id]

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(self, *_: Any) -> None:
        self.__exit__()


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    proxy = app[PROXY_KEY]
    proxy.loop = asyncio.get_running_loop()
    await proxy.storage.open()
    for c in proxy.clients.values():
        await c.open()
    dispatcher = asyncio.get_running_loop().create_task(proxy._dispatch_events())
    sweeper = asyncio.get_running_loop().create_task(proxy.sweep_forever())
    stack = contextlib.AsyncExitStack()
    from .tasks import TaskService

    task_service = TaskService.of(proxy)
    try:
        await task_service.start()  # the durable task poller (resumes unfinished tasks)
        for cm in proxy.registry.pm.hook.lifespan(proxy=proxy):
            if cm is not None:
                await stack.enter_async_context(cm)
        yield
    finally:
        await task_service.stop()
        await proxy.wait_idle()
        await stack.aclose()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proxy._events.join(), 5)
        for t in (dispatcher, sweeper):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await proxy.watcher.close()
        for c in proxy.clients.values():
            await c.close()
        await proxy.billing.close()
        await proxy.storage.close()


# request ids: a random per-process prefix and a counter (unique without a
# random draw -- a syscall -- per request; they are names, not secrets)
_ids = itertools.count(1)
_ID_PREFIX = "req_" + secrets.token_hex(6)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):012x}"


def _with_request_id(handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
    # set by each route's handler, not by a middleware: any middleware makes
    # aiohttp add two coroutine layers and a cache lookup to every request
    async def wrapped(request: web.Request) -> web.StreamResponse:
        request[REQUEST_ID_KEY] = new_request_id()
        return await handler(request)

    wrapped.__name__ = getattr(handler, "__name__", "handler")
    wrapped.__doc__ = handler.__doc__
    return wrapped


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    rid = request.get(REQUEST_ID_KEY)
    if not rid:  # no route matched (aiohttp's own 404 / 405): every response carries one
        rid = request[REQUEST_ID_KEY] = new_request_id()
    response.headers["x-request-id"] = rid


def make_app(config: Config, registry: Registry, *, storage: Any = None, workers: int = 1) -> web.Application:
    """Build the aiohttp application (validates config against the registry);
    ``workers``: the processes of ``serve --workers N`` that share the database."""
    from . import views

    config = with_defaults(config, registry)
    catalog = build_catalog(config, registry)
    storage = storage if storage is not None else open_storage(config, registry)
    app = web.Application(client_max_size=config.server.max_body_bytes)
    proxy = Proxy(config, registry, catalog, storage, workers=workers)
    app[PROXY_KEY] = proxy
    app.on_response_prepare.append(_on_prepare)
    app.cleanup_ctx.append(_lifecycle)
    taken: set[tuple[str, str]] = set()

    def add(method: str, path: str, handler: Callable[..., Any], owner: str, *, sets_id: bool = False) -> None:
        if (method, path) in taken:
            raise ConfigError(f"route {method} {path} from {owner} is already served")
        taken.add((method, path))
        app.router.add_route(method, path, handler if sets_id else _with_request_id(handler))

    views.add_core_routes(add)
    for proto in registry.protocols.values():
        for route in proto.routes():
            add(route.method, route.path, _protocol_handler(proto, route), f"protocol {proto.name}", sets_id=True)
    for method, path, handler, plugin in registry.routes:
        add(method, path, handler, f"plugin {plugin}")
    return app


def _protocol_handler(proto: Any, route: Any) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.StreamResponse:
        request[REQUEST_ID_KEY] = new_request_id()
        return await pipeline.handle(request.app[PROXY_KEY], proto, route, request)

    handler.__name__ = f"{proto.name}:{route.operation}"
    return handler
