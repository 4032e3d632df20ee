"""Pricing of tasks: the ``per_second_by_resolution`` scheme, ``per_token``
in task mode, two-decimal rounding, and the startup checks that refuse a task
model that cannot be served or priced."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cheapproxy import ir
from cheapproxy.catalog import build_catalog, with_defaults
from cheapproxy.config import parse_config
from cheapproxy.default_plugins.per_second_pricing import PerSecondByResolutionScheme, PerSecondOptions, TaskOnlyScheme
from cheapproxy.default_plugins.per_token_pricing import PerTokenOptions, PerTokenScheme
from cheapproxy.errors import ConfigError, StartupError
from cheapproxy.registry import build_registry
from cheapproxy.tasks.service import validate_task_models

TABLE = {"480p": Decimal("0.05"), "720p": Decimal("0.10"), "1080p": Decimal("0.30"), "1792x1024": Decimal("0.50")}


def scheme(table: dict[str, Any] | None = None) -> Any:
    return PerSecondByResolutionScheme(PerSecondOptions(per_second=table or TABLE))


ZERO = ir.Usage()


@pytest.mark.parametrize(("task", "cost"), [
    ({"seconds": 8, "resolution": "720p"}, "0.80"),
    ({"seconds": 4, "size": "1792x1024", "resolution": "1080p"}, "2.00"),  # the exact size wins
    ({"seconds": 4, "size": "1280x720"}, "0.40"),                          # a size's class: 720p
    ({"seconds": 4, "size": "1024x1792"}, "1.20"),                         # 1024 short side -> 1080p
    ({"seconds": 3, "resolution": "2160p"}, "1.50"),                       # not listed: the highest price
    ({"duration": 5, "resolution": "480p"}, "0.25"),                       # no reported seconds: requested
    ({"seconds": 7, "duration": 5, "resolution": "480p"}, "0.35"),         # reported seconds win
])
def test_per_second_lookup(task: dict[str, Any], cost: str) -> None:
    assert scheme().cost(ZERO, task=task) == Decimal(cost)


def test_default_key_and_rounding() -> None:
    s = scheme({"default": Decimal("0.0125"), "720p": Decimal("0.003")})
    assert s.cost(ZERO, task={"seconds": 10}) == Decimal("0.13")  # 0.125 rounds half up
    assert s.cost(ZERO, task={"seconds": 1, "resolution": "720p"}) == Decimal("0.01")  # 0.003 is never 0.00
    assert s.cost(ZERO, task={"seconds": 1, "resolution": "4k"}) == Decimal("0.01")  # default, 0.0125 -> 0.01
    assert s.estimate_max(input_tokens=0, max_output_tokens=0, task={"duration": 3, "resolution": "720p"}) == Decimal("0.01")


def test_a_free_table_costs_zero() -> None:
    assert scheme({"720p": Decimal(0)}).cost(ZERO, task={"seconds": 9, "resolution": "720p"}) == Decimal("0.00")


def test_check_task_refuses_unpriced_resolutions() -> None:
    s = scheme()
    s.check_task({"resolution": "720p"})
    s.check_task({})  # nothing asked: the provider default is priced later
    with pytest.raises(ValueError, match=r"resolution '4k' is not offered for this model \(priced: 1080p, 1792x1024, 480p, 720p\)"):
        s.check_task({"resolution": "4k"})
    scheme({"default": Decimal(1)}).check_task({"resolution": "4k"})


def test_per_second_prices_tasks_only() -> None:
    with pytest.raises(TaskOnlyScheme):
        scheme().estimate_max(input_tokens=10, max_output_tokens=10)
    with pytest.raises(TaskOnlyScheme):
        scheme().cost(ir.Usage(output_tokens=5))


@given(st.integers(min_value=1, max_value=10_000), st.decimals(min_value=0, max_value=100, places=4))
def test_task_charges_are_whole_cents_and_never_free(seconds: int, price: Decimal) -> None:
    cost = scheme({"720p": price}).cost(ZERO, task={"seconds": seconds, "resolution": "720p"})
    exact = seconds * price
    assert cost == cost.quantize(Decimal("0.01"))
    if exact == 0:
        assert cost == 0
    elif exact < Decimal("0.005"):
        assert cost == Decimal("0.01")
    else:
        assert abs(cost - exact) <= Decimal("0.005")
        assert cost - exact != Decimal("-0.005")  # an exact half cent rounds up


def test_per_token_task_mode_counts_every_token_as_output() -> None:
    s = PerTokenScheme(PerTokenOptions(input=Decimal("100"), output=Decimal("2.50")))
    assert s.cost(ir.Usage(output_tokens=108_900), task={"kind": "video"}) == Decimal("0.27")
    assert s.cost(ir.Usage(output_tokens=50_000), task={"kind": "video"}) == Decimal("0.13")
    assert s.cost(ir.Usage(output_tokens=50_000)) == Decimal("0.125000")  # a request: micro-dollars


def catalog_for(toml: str) -> Any:
    import tomllib

    registry = build_registry()
    config = with_defaults(parse_config(tomllib.loads(toml), file="t.toml"), registry)
    return build_catalog(config, registry)


@pytest.mark.parametrize(("table", "message"), [
    ("[models.price.per_second]\n", "per_second needs at least one resolution"),
    ('[models.price.per_second]\n"720p" = -1\n', "per_second.720p must not be negative"),
    ('[models.price.per_second]\n"big" = 1\n', "per_second key 'big' must be a resolution"),
    ('[models.price.per_second]\n"720p" = "x"\n', "per_second"),
])
def test_bad_tables_are_refused_naming_the_key(table: str, message: str) -> None:
    toml = f"""
[[models]]
name = "v"
upstream = "demo"
kind = "video"
[models.price]
scheme = "per_second_by_resolution"
{table}"""
    with pytest.raises(ConfigError) as exc:
        catalog_for(toml)
    assert "t.toml" in str(exc.value) and "models[0].price" in str(exc.value) and message in str(exc.value)


def test_missing_table_is_refused() -> None:
    with pytest.raises(ConfigError, match="per_second"):
        catalog_for('[[models]]\nname = "v"\nupstream = "demo"\nkind = "video"\n[models.price]\nscheme = "per_second_by_resolution"\n')


@pytest.mark.parametrize(("toml", "message"), [
    ('[[models]]\nname = "c"\nupstream = "demo"\n[models.price]\nscheme = "per_second_by_resolution"\n'
     '[models.price.per_second]\n"720p" = 1\n', "model 'c' is a chat model priced per second"),
    ('[[upstreams]]\nname = "sora"\nprovider = "openai-video"\napi_key = "k"\n'
     '[[models]]\nname = "v"\nupstream = "sora"\nkind = "video"\n[models.price]\noutput = 1\n',
     "model 'v' is priced by tokens but provider type 'openai-video' reports only seconds"),
    ('[[upstreams]]\nname = "oa"\nprovider = "openai"\napi_key = "k"\n'
     '[[models]]\nname = "v"\nupstream = "oa"\nkind = "audio"\n',
     "model 'v' (audio) uses upstream 'oa', whose provider type 'openai' cannot run audio tasks"),
])
def test_task_models_that_cannot_be_served_or_priced_stop_startup(toml: str, message: str) -> None:
    with pytest.raises(StartupError) as exc:
        validate_task_models(catalog_for(toml))
    assert message in str(exc.value)


async def test_the_gateway_refuses_to_start_with_such_a_model(aiohttp_server: Any, tmp_path: Any) -> None:
    import tomllib

    from cheapproxy.app import make_app

    toml = ('[[upstreams]]\nname = "sora"\nprovider = "openai-video"\napi_key = "k"\n'
            '[[models]]\nname = "v"\nupstream = "sora"\nkind = "video"\n[models.price]\noutput = 1\n')
    data = tomllib.loads(toml)
    data["server"] = {"database": f"sqlite:///{tmp_path / 'x.db'}"}
    app = make_app(parse_config(data, file="t.toml"), build_registry())
    with pytest.raises(StartupError, match="priced by tokens"):
        await aiohttp_server(app)


def test_demo_models_pass_the_startup_checks() -> None:
    catalog = catalog_for("")
    validate_task_models(catalog)
    assert {m.name: m.config.kind for m in catalog.models.values() if m.config.kind != "chat"} == {
        "demo-embed": "embedding", "demo-image": "image", "demo-image-task": "image", "demo-video": "video",
        "demo-audio": "audio"}
