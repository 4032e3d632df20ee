"""The cheapproxy plugin API.

Plugins are modules with ``@cheapproxy.hookimpl`` functions named after these
hooks, discovered through the ``cheapproxy`` entry-point group (first-party
plugins too).  Arguments are passed by keyword, so an implementation may accept
fewer arguments than a spec lists.

Registration hooks run once at startup and receive a ``register`` callable; the
core records which plugin registered what and refuses duplicates by name.  The
request path never goes through pluggy: it calls the registered objects
directly (pluggy is synchronous and does not await).  No hook is
``firstresult``.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("cheapproxy")
hookimpl = pluggy.HookimplMarker("cheapproxy")


@hookspec
def register_provider_types(register: Callable[[type], None]) -> None:
    """Register provider types (subclasses of ``cheapproxy.provider.ProviderType``).

    ``register(cls)`` uses ``cls.name`` as the ``provider = "..."`` value of
    ``[[upstreams]]`` tables.  A name registered twice stops startup.
    """


@hookspec
def register_protocols(register: Callable[[Any], None]) -> None:
    """Register wire-format codecs (instances of ``cheapproxy.protocol.Protocol``).

    ``register(codec)`` uses ``codec.name`` (``openai-chat``, ``anthropic-messages``
    ...).  The codec's client-side routes are mounted on the app; its upstream
    side is used by every provider type whose ``protocol`` names it.
    """


@hookspec
def register_pricing_schemes(register: Callable[[type], None]) -> None:
    """Register pricing schemes (subclasses of ``cheapproxy.pricing.PricingScheme``).

    ``register(cls)`` uses ``cls.name`` as the ``[models.price] scheme`` value.
    """


@hookspec
def register_storage_backends(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register storage backends by URL scheme.

    ``register("sqlite", factory)`` where ``factory(url, config_dir)`` returns an
    object implementing ``cheapproxy.storage.Storage``.
    """


@hookspec
def register_routes(register: Callable[[str, str, Callable[..., Any]], None]) -> None:
    """Register extra HTTP routes: ``register(method, path, handler)``.

    ``handler(request)`` is an aiohttp handler; the app's state is reachable as
    ``request.app[cheapproxy.app_keys.PROXY_KEY]``.  Paths already served by the
    core or a protocol are refused.
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add click commands to the ``cheapproxy`` CLI group ``cli``."""


@hookspec
def track_event(event: Any, proxy: Any) -> None:
    """Observe an event (``cheapproxy.events``: CallFinished, UpstreamCooledDown,
    RequestRejected, ...).  ``proxy`` is the running ``cheapproxy.app.Proxy``
    that emitted it (several can live in one process, e.g. in tests).

    Called from a bounded queue on a background task, never on the request
    path, so a slow observer cannot stall a stream.  Implementations must be
    quick and must not raise; exceptions are logged and dropped.
    """


@hookspec
def lifespan(proxy: Any) -> Any:
    """Return an async context manager entered at startup and exited at
    shutdown, or None.  ``proxy`` is the running ``cheapproxy.app.Proxy``.
    Raise ``cheapproxy.errors.StartupError`` to refuse to start."""
