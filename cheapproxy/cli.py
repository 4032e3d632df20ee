"""The ``cheapproxy`` command line.  Every listing and create command takes
``--json`` and then prints one JSON document on stdout and nothing else;
errors are one line on stderr with exit status 1."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from decimal import Decimal, InvalidOperation
from typing import Any, Awaitable, Callable

import click
import orjson

from . import __version__
from .errors import CheapproxyError


class State:
    def __init__(self, config_path: str | None, debug: bool) -> None:
        self.config_path = config_path
        self.debug = debug
        self._loaded: tuple[Any, Any] | None = None

    def load(self) -> tuple[Any, Any]:
        """(config, registry), with config-less defaults applied."""
        if self._loaded is None:
            from .catalog import with_defaults
            from .config import find_config_path, load_config
            from .registry import build_registry

            config = load_config(find_config_path(self.config_path))
            registry = build_registry(disable=config.plugins.disable)
            self._loaded = (with_defaults(config, registry), registry)
        return self._loaded

    def with_storage(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        from .app import open_storage

        config, registry = self.load()

        async def run() -> Any:
            storage = open_storage(config, registry)
            await storage.open()
            try:
                return await fn(storage)
            finally:
                await storage.close()

        return asyncio.run(run())


def _out(data: Any) -> None:
    click.echo(orjson.dumps(data, default=_default, option=orjson.OPT_INDENT_2).decode())


def _default(o: Any) -> Any:
    if isinstance(o, Decimal):
        return str(o)
    if isinstance(o, (dt.datetime, dt.date)):
        return o.isoformat()
    raise TypeError(type(o).__name__)


def money(value: str) -> Decimal:
    try:
        d = Decimal(value)
    except InvalidOperation:
        raise click.BadParameter(f"{value!r} is not an amount in USD") from None
    if not d.is_finite() or d < 0 or d != d.quantize(Decimal("0.000001")) or d > Decimal("1000000000"):
        raise click.BadParameter(f"{value!r} must be a non-negative USD amount with at most 6 decimals")
    return d


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CheapproxyError as exc:
            if ctx.obj and ctx.obj.debug:
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=Group)
@click.option("--config", "config_path", default=None, help="Config file (else $CHEAPPROXY_CONFIG, else ./cheapproxy.toml, else defaults).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(__version__, prog_name="cheapproxy")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, debug: bool) -> None:
    """cheapproxy: one API key and one prepaid balance across every LLM protocol."""
    ctx.obj = State(config_path, debug)


# ---------------------------------------------------------------- serve / check / plugins


@cli.command()
@click.option("--host", default=None, help="Listen address (default from config, 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Listen port (default from config, 8787).")
@click.option("--workers", type=int, default=1, show_default=True, help="Processes sharing the port (one shared database).")
@click.pass_obj
def serve(state: State, host: str | None, port: int | None, workers: int) -> None:
    """Run the proxy.  SIGTERM/SIGINT drain in-flight requests, then exit 0."""
    from .serve import run

    config, registry = state.load()
    run(config, registry, host=host, port=port, workers=workers)


@cli.command()
@click.pass_obj
def check(state: State) -> None:
    """Validate config, plugins and database; exit non-zero with the reason."""
    from .catalog import build_catalog

    from .tasks import validate_task_models

    config, registry = state.load()
    catalog = build_catalog(config, registry)
    validate_task_models(catalog)  # a task model its provider cannot run or price

    async def probe(storage: Any) -> tuple[bool, str]:
        # the backend's own (password-masked) URL, never the configured string
        return bool(await storage.ping()), str(getattr(storage, "url", "") or config.server.database.split("://")[0] + "://…")

    ok, where = state.with_storage(probe)
    if not ok:
        raise click.ClickException("database does not answer")
    click.echo(
        f"ok: {len(registry.plugins)} plugins, {len(catalog.upstreams)} upstreams, {len(catalog.models)} models, "
        f"database {where}"
    )


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def plugins(state: State, as_json: bool) -> None:
    """Every discovered plugin: name, distribution, version, what it provides."""
    from .registry import build_registry

    registry = build_registry()
    rows = [
        {"name": i.name, "distribution": i.distribution, "version": i.version, "module": i.module,
         "hooks": i.hooks, "provides": i.provides}
        for i in sorted(registry.plugins.values(), key=lambda i: i.name)
    ]
    if as_json:
        _out(rows)
        return
    for r in rows:
        provides = "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(r["provides"].items())) or "-"
        click.echo(f"{r['name']:<20} {r['distribution']}=={r['version']:<10} {provides}")


# ---------------------------------------------------------------- users


@cli.group()
def users() -> None:
    """Create and list users."""


def _user_json(u: Any) -> dict[str, Any]:
    return {"name": u.name, "balance": str(u.balance), "held": str(u.held),
            "available": str(u.balance - u.held), "created_at": u.created_at}


@users.command("add")
@click.argument("name")
@click.option("--balance", type=money, default="0", help="Opening balance in USD.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def users_add(state: State, name: str, balance: Decimal, as_json: bool) -> None:
    async def go(s: Any) -> Any:
        if await s.get_user(name) is not None:
            raise click.ClickException(f"user {name!r} already exists")
        return await s.create_user(name, balance)

    u = state.with_storage(go)
    if as_json:
        _out({"name": u.name, "balance": str(u.balance)})
    else:
        click.echo(f"created user {u.name} with balance ${u.balance}")


@users.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def users_list(state: State, as_json: bool) -> None:
    rows = state.with_storage(lambda s: s.list_users())
    if as_json:
        _out([_user_json(u) for u in rows])
        return
    for u in rows:
        click.echo(f"{u.name:<24} balance ${u.balance}  held ${u.held}")


@users.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def users_show(state: State, name: str, as_json: bool) -> None:
    async def go(s: Any) -> Any:
        u = await s.get_user(name)
        if u is None:
            raise click.ClickException(f"no user {name!r}")
        return u, await s.list_keys(name)

    u, keys = state.with_storage(go)
    if as_json:
        _out({**_user_json(u), "keys": [k.id for k in keys]})
        return
    click.echo(f"{u.name}: balance ${u.balance}, held ${u.held}, available ${u.balance - u.held}, {len(keys)} key(s)")


@cli.command()
@click.argument("name")
@click.argument("usd", type=money)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def topup(state: State, name: str, usd: Decimal, as_json: bool) -> None:
    """Add USD to a user's balance (a ledger row)."""
    import secrets

    if usd <= 0:
        raise click.BadParameter("the amount must be positive", param_hint="USD")

    async def go(s: Any) -> Any:
        u = await s.get_user(name)
        if u is None:
            raise click.ClickException(f"no user {name!r}")
        return await s.credit(u.id, usd, kind="topup", reference="topup_" + secrets.token_hex(8), note="cli topup")

    bal = state.with_storage(go)
    if as_json:
        _out({"name": name, "amount": str(usd), "balance": str(bal)})
    else:
        click.echo(f"{name}: +${usd}, balance ${bal}")


from . import cli_keys  # noqa: E402,F401  (keys / usage / tasks commands)
from . import cli_tasks  # noqa: E402,F401  (tasks list / show)


def main() -> None:
    try:
        from .registry import build_registry

        registry = build_registry()
        registry.pm.hook.register_commands(cli=cli)
    except CheapproxyError as exc:
        # plugin failures are reported by the command that needs them
        if len(sys.argv) > 1 and sys.argv[1] in ("serve", "check", "plugins"):
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
    cli(prog_name="cheapproxy")
