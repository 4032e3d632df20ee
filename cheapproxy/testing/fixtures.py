"""pytest fixtures for cheapproxy and its plugin authors (a ``pytest11`` plugin).

* ``fake_upstream(protocol)`` starts a loopback fake upstream speaking that
  protocol's wire format (see docs/dev/fakes.md) and returns ``FakeUpstream``
  with its ``url`` and the ``log`` of requests it received.
* ``gateway(config_toml, ...)`` starts the real app on a loopback port with a
  fresh SQLite database, one user and one key, and returns ``Gateway``.
"""

from __future__ import annotations

import importlib
import textwrap
from decimal import Decimal
from typing import Any, Awaitable, Callable

import attrs
import pytest

UPSTREAM_SECRET = "upstream-secret"

FAKES = {
    "openai-chat": "cheapproxy.testing.fake_openai_chat",
    "openai-responses": "cheapproxy.testing.fake_openai_responses",
    "anthropic-messages": "cheapproxy.testing.fake_anthropic",
    "gemini": "cheapproxy.testing.fake_gemini",
}

# provider type and the base-URL suffix for each protocol's fake
PROVIDERS = {
    "openai-chat": ("openai", "/v1"),
    "openai-responses": ("openai-responses", "/v1"),
    "anthropic-messages": ("anthropic", ""),
    "gemini": ("gemini", ""),
}


@attrs.define
class FakeUpstream:
    protocol: str
    url: str  # base URL to put in [[upstreams]] base_url
    log: list[dict[str, Any]]
    server: Any

    @property
    def provider(self) -> str:
        return PROVIDERS[self.protocol][0]

    def toml(self, name: str, **extra: Any) -> str:
        lines = [
            "[[upstreams]]",
            f'name = "{name}"',
            f'provider = "{self.provider}"',
            f'base_url = "{self.url}"',
            f'api_key = "{UPSTREAM_SECRET}"',
        ]
        lines += [f"{k} = {_toml_value(v)}" for k, v in extra.items()]
        return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


@attrs.define
class Gateway:
    url: str
    key: str
    key_id: str
    user: str
    proxy: Any
    server: Any

    @property
    def storage(self) -> Any:
        return self.proxy.storage

    async def balance(self, user: str | None = None) -> Decimal:
        u = await self.storage.get_user(user or self.user)
        return u.balance

    async def create_user(self, name: str, balance: str = "10") -> Any:
        return await self.storage.create_user(name, Decimal(balance))

    async def create_key(self, user: str | None = None, **opts: Any) -> tuple[str, str]:
        from cheapproxy.cli_keys import create_key

        rec, secret = await create_key(self.storage, user or self.user, **opts)
        self.proxy.keys.invalidate()
        return rec.id, secret

    async def idle(self) -> None:
        await self.proxy.wait_idle()


@pytest.fixture
async def fake_upstream(aiohttp_server: Any) -> Callable[[str], Awaitable[FakeUpstream]]:
    async def start(protocol: str) -> FakeUpstream:
        mod = importlib.import_module(FAKES[protocol])
        log: list[dict[str, Any]] = []
        server = await aiohttp_server(mod.make_app(log))
        base = str(server.make_url("")).rstrip("/") + PROVIDERS[protocol][1]
        return FakeUpstream(protocol=protocol, url=base, log=log, server=server)

    return start


class ServedApp:
    """An app served by ``serve.make_runner`` (the production AppRunner
    settings: no handler cancellation, header deadline), on a free port."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    def make_url(self, path: str) -> str:
        return self.url + path

    async def close(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            await runner.cleanup()


@pytest.fixture
async def gateway(aiohttp_server: Any, tmp_path: Any) -> Any:
    from cheapproxy.app import make_app
    from cheapproxy.app_keys import PROXY_KEY
    from cheapproxy.config import parse_config
    from cheapproxy.registry import build_registry

    import tomllib

    counter = {"n": 0}
    served: list[ServedApp] = []

    async def start(config_toml: str = "", *, balance: str = "10.00", user: str = "alice",
                    plugins: list[tuple[str, Any]] | None = None, server_kwargs: dict[str, Any] | None = None,
                    production: bool = False, **key_opts: Any) -> Gateway:
        """``production=True`` serves the app with serve.make_runner (what
        ``cheapproxy serve`` runs) instead of aiohttp's TestServer, which
        cancels handlers on disconnect."""
        from cheapproxy.cli_keys import create_key

        counter["n"] += 1
        db = tmp_path / f"gw{counter['n']}.db"
        text = textwrap.dedent(config_toml)
        data = tomllib.loads(text)
        server = data.setdefault("server", {})
        server.setdefault("database", f"sqlite:///{db}")
        config = parse_config(data, file="test.toml", base_dir=str(tmp_path))
        registry = build_registry(plugins=plugins or ())
        app = make_app(config, registry)
        if production:
            from aiohttp import web

            from cheapproxy.serve import make_runner

            runner = make_runner(app, config)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            srv: Any = ServedApp(runner)
            served.append(srv)
        else:
            srv = await aiohttp_server(app, **(server_kwargs or {}))
        proxy = app[PROXY_KEY]
        await proxy.storage.create_user(user, Decimal(balance))
        rec, secret = await create_key(proxy.storage, user, **key_opts)
        url = str(srv.make_url("")).rstrip("/")
        return Gateway(url=url, key=secret, key_id=rec.id, user=user, proxy=proxy, server=srv)

    yield start
    while served:
        await served.pop().close()
