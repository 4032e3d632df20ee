"""pytest fixtures for async tasks (a ``pytest11`` plugin, like ``fixtures``).

* ``fake_ark`` / ``fake_openai_video``: loopback fakes of the Ark task API and
  the OpenAI Videos API (``cheapproxy.testing.fake_ark`` /
  ``fake_openai_video``), returned as ``FakeTaskUpstream`` with the base URL,
  the request ``log`` and the fake's task ``store``.
* ``task_gateway(config_toml, db=..., ...)``: like ``gateway`` but the SQLite
  file can be given, so a test can stop a gateway (``await gw.server.close()``)
  and start another on the same database (a restart); an existing user is
  reused.
* ``tasks_toml(**overrides)``: a ``[tasks]`` table with tiny poll intervals.
"""

from __future__ import annotations

import textwrap
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any, Awaitable, Callable

import attrs
import pytest

from .fixtures import UPSTREAM_SECRET, Gateway, _toml_value

FAST_TASKS = {
    "poll_interval_seconds": 0.01,
    "max_poll_interval_seconds": 0.05,
    "deadline_seconds": 30.0,
    "webhook_backoff_seconds": 0.01,
    "webhook_timeout_seconds": 5.0,
}


def tasks_toml(**overrides: Any) -> str:
    """A ``[tasks]`` table for tests: polls every 10-50 ms."""
    values = {**FAST_TASKS, **overrides}
    return "[tasks]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())


@attrs.define
class FakeTaskUpstream:
    provider: str
    url: str  # base URL for [[upstreams]] base_url
    log: list[dict[str, Any]]
    store: dict[str, Any]  # the fake's tasks by provider id
    server: Any

    def toml(self, name: str, **extra: Any) -> str:
        lines = ["[[upstreams]]", f'name = "{name}"', f'provider = "{self.provider}"', f'base_url = "{self.url}"',
                 f'api_key = "{UPSTREAM_SECRET}"']
        lines += [f"{k} = {_toml_value(v)}" for k, v in extra.items()]
        return "\n".join(lines) + "\n"

    def requests(self, method: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.log if method is None or r["method"] == method]


@pytest.fixture
async def fake_ark(aiohttp_server: Any) -> FakeTaskUpstream:
    from . import fake_ark as mod

    log: list[dict[str, Any]] = []
    app = mod.make_app(log)
    server = await aiohttp_server(app)
    return FakeTaskUpstream(provider="ark", url=str(server.make_url("/api/v3")), log=log, store=app[mod.TASKS_KEY],
                            server=server)


@pytest.fixture
async def fake_openai_video(aiohttp_server: Any) -> FakeTaskUpstream:
    from . import fake_openai_video as mod

    log: list[dict[str, Any]] = []
    app = mod.make_app(log)
    server = await aiohttp_server(app)
    return FakeTaskUpstream(provider="openai-video", url=str(server.make_url("/v1")), log=log,
                            store=app[mod.VIDEOS_KEY], server=server)


@pytest.fixture
async def task_gateway(aiohttp_server: Any, tmp_path: Path) -> Callable[..., Awaitable[Gateway]]:
    from cheapproxy.app import make_app
    from cheapproxy.app_keys import PROXY_KEY
    from cheapproxy.cli_keys import create_key
    from cheapproxy.config import parse_config
    from cheapproxy.registry import build_registry

    counter = {"n": 0}

    async def start(config_toml: str = "", *, db: Path | None = None, balance: str = "10.00", user: str = "alice",
                    plugins: list[tuple[str, Any]] | None = None, **key_opts: Any) -> Gateway:
        counter["n"] += 1
        data = tomllib.loads(textwrap.dedent(config_toml))
        path = db or tmp_path / f"tasks{counter['n']}.db"
        data.setdefault("server", {}).setdefault("database", f"sqlite:///{path}")
        config = parse_config(data, file="test.toml", base_dir=str(tmp_path))
        app = make_app(config, build_registry(plugins=plugins or ()))
        srv = await aiohttp_server(app)
        proxy = app[PROXY_KEY]
        if await proxy.storage.get_user(user) is None:
            await proxy.storage.create_user(user, Decimal(balance))
        rec, secret = await create_key(proxy.storage, user, **key_opts)
        return Gateway(url=str(srv.make_url("")).rstrip("/"), key=secret, key_id=rec.id, user=user, proxy=proxy,
                       server=srv)

    return start
