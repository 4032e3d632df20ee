"""One test per hookspec (tests/test_docs.py checks that none is missing).

Every test plugin here IS the example of its docs page: ``example(hook)`` loads
the first ```python block of docs/hooks/<hook>.md as a module and registers it
like an installed plugin, so a docs example that drifts from the real API fails
here.  Each test then asserts the hook's effect through the real app: real
HTTP on loopback, real SQLite, real money.
"""

from __future__ import annotations

import asyncio
import re
import sys
import types
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from click.testing import CliRunner

from cheapproxy import hookimpl
from cheapproxy.errors import ConfigError, StartupError
from cheapproxy.events import BalanceChanged, CallFinished, RequestRejected
from cheapproxy.registry import build_registry

DOCS = Path(__file__).parent.parent / "docs"
DEMO_INPUT, DEMO_OUTPUT = Decimal("1.00"), Decimal("2.00")  # the demo model's USD per 1M tokens
PER = Decimal(1_000_000)


def _block(hook: str, lang: str) -> str:
    text = (DOCS / "hooks" / f"{hook}.md").read_text(encoding="utf-8")
    m = re.search(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)
    assert m, f"docs/hooks/{hook}.md has no ```{lang} block"
    return m.group(1)


def example(hook: str) -> types.ModuleType:
    """The docs page's Python example, loaded as a fresh module."""
    name = f"docs_example_{hook}"
    mod = types.ModuleType(name)
    mod.__file__ = str(DOCS / "hooks" / f"{hook}.md")
    sys.modules[name] = mod  # attrs/cattrs resolve classes through sys.modules
    exec(compile(_block(hook, "python"), mod.__file__, "exec"), mod.__dict__)
    return mod


def toml_example(hook: str) -> str:
    return _block(hook, "toml")


def plugin(name: str, **hooks: Any) -> types.ModuleType:
    """A one-off plugin module made of the given hook implementations."""
    mod = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(mod, hook, hookimpl(fn))
    return mod


async def post(gw: Any, path: str, body: Any, key: str | None = None, **headers: str) -> tuple[int, Any, bytes]:
    hdrs = {"Content-Type": "application/json", **headers}
    if key is not None:
        hdrs["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as s:
        data = body if isinstance(body, (bytes, str)) else orjson.dumps(body)
        async with s.post(gw.url + path, data=data, headers=hdrs) as r:
            return r.status, r.headers.copy(), await r.read()


async def ledger(gw: Any) -> list[Any]:
    user = await gw.storage.get_user(gw.user)
    return await gw.storage.ledger(user.id)


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "demo", "messages": [{"role": "user", "content": content}], **extra}


# ---------------------------------------------------------------- register_provider_types


async def test_hook_register_provider_types(gateway):
    mod = example("register_provider_types")
    models = '[[models]]\nname = "loud-model"\nupstream = "loud"\n[models.price]\ninput = 1.00\noutput = 2.00\n'
    gw = await gateway(toml_example("register_provider_types") + models, plugins=[("shout-example", mod)])
    assert gw.proxy.registry.plugins["shout-example"].provides == {"provider_types": ["shout"]}
    assert gw.proxy.catalog.upstreams["loud"].provider.options.suffix == "!!!"

    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="loud-model", messages=[{"role": "user", "content": "hello there"}])
    answer = raw.parse()
    assert answer.choices[0].message.content == "HELLO THERE!!!"
    assert answer.choices[0].finish_reason == "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (3, 2)
    assert raw.headers["x-cheapproxy-cost"] == "0.000007"  # 3 x $1/M + 2 x $2/M

    stream = await client.chat.completions.create(
        model="loud-model", messages=[{"role": "user", "content": "again"}], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "AGAIN!!!"
    await gw.idle()
    assert await gw.balance() == Decimal("10.00") - 2 * Decimal("0.000007")

    # the provider's own TOML key is declared: a typo is refused, naming the key
    with pytest.raises(ConfigError, match="sufix"):
        await gateway(toml_example("register_provider_types").replace("suffix", "sufix") + models,
                      plugins=[("shout-example", mod)])


# ---------------------------------------------------------------- register_protocols


async def test_hook_register_protocols(gateway):
    mod = example("register_protocols")
    gw = await gateway(plugins=[("tiny-protocol", mod)])
    assert gw.proxy.registry.plugins["tiny-protocol"].provides == {"protocols": ["tiny"]}

    status, headers, body = await post(gw, "/tiny/v1/ask", {"model": "demo", "prompt": "hello"}, gw.key)
    assert status == 200
    # the demo counts ceil(bytes / 4): "hello" is 2 input tokens, "echo: hello" 3 output tokens
    assert body == b'{"answer":"echo: hello","tokens":5}'
    assert headers["x-cheapproxy-cost"] == "0.000008"
    assert headers["x-request-id"].startswith("req_")

    status, headers, body = await post(gw, "/tiny/v1/ask", {"model": "demo", "prompt": "hi you", "stream": True}, gw.key)
    assert status == 200 and headers["Content-Type"] == "text/plain; charset=utf-8"
    assert body == b"echo: hi you"

    # errors come back in the codec's own shape, with the core's statuses
    status, _, body = await post(gw, "/tiny/v1/ask", {"model": "demo", "prompt": 1}, gw.key)
    assert (status, body) == (400, b'{"error":"\'prompt\' must be a string."}')
    status, _, body = await post(gw, "/tiny/v1/ask", {"model": "nope", "prompt": "x"}, gw.key)
    assert status == 404 and b"'nope' does not exist" in body
    status, _, body = await post(gw, "/tiny/v1/ask", {"model": "demo", "prompt": "x"})
    assert status == 401 and body.startswith(b'{"error":"Missing API key')

    await gw.idle()
    records = await gw.storage.list_usage(user_name=gw.user)
    # the codec refused the prompt after the hold was taken: recorded, released, cost 0
    assert sorted((r.protocol, r.streamed, r.status, r.cost) for r in records) == [
        ("tiny", False, "error", Decimal(0)), ("tiny", False, "ok", Decimal("0.000008")),
        ("tiny", True, "ok", Decimal("0.000008"))]
    assert await gw.balance() == Decimal("10.00") - 2 * Decimal("0.000008")


# ---------------------------------------------------------------- register_pricing_schemes


async def test_hook_register_pricing_schemes(gateway):
    mod = example("register_pricing_schemes")
    config = '[[models]]\nname = "flat-demo"\nupstream = "demo"\n' + toml_example("register_pricing_schemes")
    gw = await gateway(config, plugins=[("flat-pricing", mod)])

    status, headers, _ = await post(gw, "/v1/chat/completions", chat("hello", model="flat-demo"), gw.key)
    assert status == 200 and headers["x-cheapproxy-cost"] == "0.020000"
    status, _, _ = await post(gw, "/v1/chat/completions", chat("a much longer prompt " * 50, model="flat-demo", stream=True), gw.key)
    assert status == 200
    await gw.idle()
    assert await gw.balance() == Decimal("9.96")
    charges = [e for e in await ledger(gw) if e.kind == "charge"]
    assert [e.amount for e in charges] == [Decimal("-0.02"), Decimal("-0.02")]

    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/v1/models/info", headers={"Authorization": f"Bearer {gw.key}"}) as r:
            info = {m["id"]: m for m in (await r.json())["data"]}
    assert info["flat-demo"]["price"] == {"scheme": "flat", "per_request": "0.02"}

    # a negative price is refused at startup, naming the table and the key
    with pytest.raises(ConfigError, match=r"models\[0\]\.price.*per_request"):
        await gateway(config.replace("0.02", "-1"), plugins=[("flat-pricing", mod)])


# ---------------------------------------------------------------- register_storage_backends


async def test_hook_register_storage_backends(gateway, tmp_path):
    mod = example("register_storage_backends")
    fast_tasks = "[tasks]\npoll_interval_seconds = 0.01\nmax_poll_interval_seconds = 0.05\n"
    gw = await gateway(toml_example("register_storage_backends") + fast_tasks, plugins=[("audited", mod)])
    assert type(gw.storage).__name__ == "AuditedSQLite"
    assert (tmp_path / "state.db").is_file()  # relative to the config file's directory

    # a request: settled through the group commit
    status, headers, _ = await post(gw, "/v1/chat/completions", chat("hello"), gw.key)
    assert status == 200
    await gw.idle()
    assert gw.storage.charged == [(headers["x-request-id"], Decimal("0.000008"))]
    # a request refused before its hold never reaches the storage's money methods
    status, _, _ = await post(gw, "/v1/chat/completions", chat("hello", model="nope"), gw.key)
    assert status == 404

    # an async task: settled on its own hold, at $0.05 per second of 720p
    status, _, body = await post(gw, "/v1/videos/generations",
                                 {"model": "demo-video", "prompt": "cats", "duration": 5, "resolution": "720p"}, gw.key)
    assert status == 200
    task_id = orjson.loads(body)["task_id"]
    await _until(lambda: len(gw.storage.charged) == 2)
    assert gw.storage.charged[1] == (task_id, Decimal("0.25"))
    await gw.idle()
    assert await gw.balance() == Decimal("10.00") - Decimal("0.000008") - Decimal("0.25")


# ---------------------------------------------------------------- register_routes


async def test_hook_register_routes(gateway):
    mod = example("register_routes")
    gw = await gateway(plugins=[("whoami", mod)])
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/api/whoami", headers={"x-api-key": gw.key}) as r:
            assert r.status == 200 and r.headers["x-request-id"].startswith("req_")
            assert await r.json() == {"user": "alice", "balance": "10.000000"}
        async with s.get(gw.url + "/api/whoami") as r:
            assert r.status == 401
            assert (await r.json())["error"].startswith("Missing API key")

    # a path the core already serves stops startup
    clash = plugin("clash", register_routes=lambda register: register("GET", "/health", mod.whoami))
    with pytest.raises(ConfigError, match="route GET /health from plugin clash is already served"):
        await gateway(plugins=[("clash", clash)])


# ---------------------------------------------------------------- register_commands


def test_hook_register_commands(tmp_path, monkeypatch, capsys):
    from cheapproxy import cli as cli_module

    mod = example("register_commands")
    cfg = tmp_path / "cheapproxy.toml"
    cfg.write_text(f'[server]\ndatabase = "sqlite:///{tmp_path}/cli.db"\n')
    registry = build_registry(plugins=[("balance-cmd", mod)])
    assert "balance" not in cli_module.cli.commands
    try:
        registry.pm.hook.register_commands(cli=cli_module.cli)
        runner = CliRunner()
        res = runner.invoke(cli_module.cli, ["--config", str(cfg), "users", "add", "bob", "--balance", "12.5"])
        assert res.exit_code == 0, res.output
        res = runner.invoke(cli_module.cli, ["--config", str(cfg), "balance", "bob"])
        assert (res.exit_code, res.stdout) == (0, "12.500000\n")
        res = runner.invoke(cli_module.cli, ["--config", str(cfg), "balance", "zed"])
        assert (res.exit_code, res.stderr) == (1, "Error: no user 'zed'\n")

        # the real entry point registers plugin commands before parsing arguments
        cli_module.cli.commands.pop("balance")
        real = build_registry
        monkeypatch.setattr("cheapproxy.registry.build_registry",
                            lambda **kw: real(plugins=[("balance-cmd", mod)], **kw))
        monkeypatch.setattr(sys, "argv", ["cheapproxy", "--config", str(cfg), "balance", "bob"])
        with pytest.raises(SystemExit) as exit_info:
            cli_module.main()
        assert exit_info.value.code == 0
        assert capsys.readouterr().out == "12.500000\n"
    finally:
        cli_module.cli.commands.pop("balance", None)


# ---------------------------------------------------------------- track_event


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting for the event"
        await asyncio.sleep(0.01)


async def test_hook_track_event(gateway):
    mod = example("track_event")
    seen: list[tuple[Any, Any]] = []
    recorder = plugin("recorder", track_event=lambda event, proxy: seen.append((event, proxy)))
    gw = await gateway(plugins=[("totals", mod), ("recorder", recorder)])

    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="demo", messages=[{"role": "user", "content": "hello world, how are you"}])
    usage = raw.parse().usage
    expected = (usage.prompt_tokens * DEMO_INPUT + usage.completion_tokens * DEMO_OUTPUT) / PER
    assert expected > 0 and Decimal(raw.headers["x-cheapproxy-cost"]) == expected

    await _until(lambda: any(e.type == "call_finished" for e, _ in seen))
    (event, proxy), = [(e, p) for e, p in seen if e.type == "call_finished"]
    assert isinstance(event, CallFinished) and proxy is gw.proxy
    assert event.request_id == raw.headers["x-request-id"]
    assert (event.model, event.upstream, event.protocol, event.status, event.http_status) == (
        "demo", "demo", "openai-chat", "ok", 200)
    assert event.cost == expected
    assert (event.usage.input_tokens, event.usage.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert mod.totals == {"demo": expected}

    # a request refused before any upstream call is observed too
    status, _, _ = await post(gw, "/v1/messages", {"model": "demo", "max_tokens": 5, "messages": []}, "cp-wrong")
    assert status == 401
    await _until(lambda: any(e.type == "request_rejected" for e, _ in seen))

    # a transfer: one balance_changed per side (a refused one: none)
    bob = await gw.storage.create_user("bob-hooks", Decimal(0))
    status, body, _ = await post(gw, "/api/user/transfer", {"toUsername": "bob-hooks", "amount": "1.25"}, gw.key)
    assert status == 200, body
    status, _, _ = await post(gw, "/api/user/transfer", {"toUsername": "bob-hooks", "amount": "999999"}, gw.key)
    assert status == 400
    await _until(lambda: sum(e.type == "balance_changed" for e, _ in seen) == 2)
    me = await gw.storage.get_user(gw.user)
    changes = sorted((e.user_id, e.amount, e.kind) for e, _ in seen if isinstance(e, BalanceChanged))
    assert changes == sorted([(me.id, Decimal("-1.25"), "transfer_out"), (bob.id, Decimal("1.25"), "transfer_in")])
    rejected = [e for e, _ in seen if e.type == "request_rejected"]
    assert rejected == [RequestRejected(protocol="anthropic-messages", http_status=401, kind="authentication")]
    assert mod.totals == {"demo": expected}


# ---------------------------------------------------------------- lifespan


def _reporter_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "example.open_holds"]


async def test_hook_lifespan(gateway):
    mod = example("lifespan")
    mod.INTERVAL_SECONDS = 0.005
    assert _reporter_tasks() == []
    gw = await gateway(plugins=[("holds-reporter", mod)])
    (task,) = _reporter_tasks()
    await asyncio.sleep(0.05)
    # still looping: open_holds() worked, so the storage was open when it was entered
    assert not task.done()

    await gw.server.close()  # app shutdown: the context manager is exited
    assert task.cancelled()
    assert _reporter_tasks() == []


async def test_hook_lifespan_startup_error_refuses_to_start(gateway):
    def refuse(proxy: Any) -> Any:
        raise StartupError("refusing: example setting 'x' is missing")

    with pytest.raises(StartupError, match="example setting 'x' is missing"):
        await gateway(plugins=[("refuser", plugin("refuser", lifespan=refuse))])
