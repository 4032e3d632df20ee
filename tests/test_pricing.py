"""Pricing: exact Decimal costs, the single rounding rule, bounds, config."""

from __future__ import annotations

import importlib.metadata
from decimal import Decimal

import pluggy
import pytest
import tomllib
from hypothesis import given, settings
from hypothesis import strategies as st

from cheapproxy import hookspecs, ir
from cheapproxy.config import parse_config, structure_options
from cheapproxy.default_plugins import per_token_pricing
from cheapproxy.default_plugins.per_token_pricing import PerTokenOptions, PerTokenScheme
from cheapproxy.errors import ConfigError
from cheapproxy.pricing import MAX_CHARGE, MAX_TOKENS, MICRO, PricingScheme, clamp_tokens, clamp_usage, round_charge

D = Decimal


def scheme(**prices: str) -> PerTokenScheme:
    return PerTokenScheme(PerTokenOptions(**{k: D(v) for k, v in prices.items()}))


SONNET = scheme(input="3.00", output="15.00", cache_write="3.75", cache_read="0.30")


def test_exact_cost_with_cache_tokens() -> None:
    usage = ir.Usage(input_tokens=1000, output_tokens=500, cache_write_tokens=2000, cache_read_tokens=10_000)
    # 1000*3 + 500*15 + 2000*3.75 + 10000*0.30 = 3000 + 7500 + 7500 + 3000 = 21000 per 1M
    assert SONNET.cost(usage) == D("0.021000")
    # the fake-upstream usage (U=10, R=5, W=2, O=7): 30 + 1.5 + 7.5 + 105 = 144 per 1M
    assert SONNET.cost(ir.Usage(input_tokens=10, cache_read_tokens=5, cache_write_tokens=2, output_tokens=7)) == D("0.000144")
    # reasoning tokens are part of output_tokens: never billed twice
    assert SONNET.cost(ir.Usage(output_tokens=100, reasoning_tokens=60)) == D("0.0015")
    assert SONNET.cost(ir.Usage()) == 0


def test_rounds_up_to_micro_usd_never_zero() -> None:
    cheap = scheme(input="0.075", output="0.30")
    assert cheap.cost(ir.Usage(input_tokens=1)) == D("0.000001")  # 0.000000075 rounds up
    assert cheap.cost(ir.Usage(input_tokens=13, output_tokens=1)) == D("0.000002")  # 0.000001275
    assert cheap.cost(ir.Usage(input_tokens=40)) == D("0.000003")  # exactly 0.000003 stays
    assert str(cheap.cost(ir.Usage(input_tokens=40))) == "0.000003"


def test_cache_prices_default_to_input_price() -> None:
    s = scheme(input="2", output="8")
    assert (s.cache_write, s.cache_read) == (D(2), D(2))
    assert s.cost(ir.Usage(cache_read_tokens=1_000_000, cache_write_tokens=500_000)) == D("3.000000")
    free_cache = scheme(input="2", output="8", cache_read="0")
    assert free_cache.cost(ir.Usage(cache_read_tokens=1_000_000)) == 0
    assert free_cache.describe() == {"scheme": "per_token", "unit": "USD per 1M tokens", "input": "2", "output": "8",
                                     "cache_write": "2", "cache_read": "0"}


def test_estimate_max_covers_the_dearest_input_bucket() -> None:
    # 1000 input tokens at max(3, 3.75, 0.30) + 4096 output at 15 = 3750 + 61440 per 1M
    assert SONNET.estimate_max(input_tokens=1000, max_output_tokens=4096) == D("0.06519")
    assert SONNET.estimate_max(input_tokens=0, max_output_tokens=0) == 0
    # absurd counts saturate instead of overflowing
    assert SONNET.estimate_max(input_tokens=10**30, max_output_tokens=-5) == D(MAX_TOKENS) * D("3.75") / 1_000_000


def test_task_tokens_count_as_output_and_round_to_cents() -> None:
    seedance = scheme(input="0", output="1.2")
    task = {"duration": 5, "resolution": "720p"}
    assert seedance.cost(ir.Usage(output_tokens=108_900), task=task) == D("0.13")  # 0.13068
    assert seedance.cost(ir.Usage(output_tokens=112_500), task=task) == D("0.14")  # 0.135 half-up
    assert seedance.cost(ir.Usage(input_tokens=100_000, output_tokens=8_900), task=task) == D("0.13")
    assert seedance.cost(ir.Usage(output_tokens=1), task=task) == D("0.01")  # non-zero never 0
    assert seedance.cost(ir.Usage(), task=task) == D("0.00")
    assert seedance.estimate_max(input_tokens=0, max_output_tokens=250_000, task=task) == D("0.30")


def test_round_charge_rule() -> None:
    assert round_charge(D("0.0000001")) == D("0.000001")
    assert round_charge(D("1.0000010")) == D("1.000001")
    assert round_charge(D("-5")) == 0
    assert round_charge(D("1e40")) == MAX_CHARGE
    assert round_charge(D("0.004"), task=True) == D("0.01")
    assert round_charge(D("0.014"), task=True) == D("0.01")
    assert round_charge(D("0.015"), task=True) == D("0.02")
    for bad in (D("NaN"), D("Infinity"), D("-Infinity")):
        with pytest.raises(ValueError):
            round_charge(bad)
    with pytest.raises(TypeError):
        round_charge(0.5)  # type: ignore[arg-type]


def test_usage_from_upstreams_is_clamped() -> None:
    assert [clamp_tokens(v) for v in (-5, True, 2.2, float("nan"), "12", None, 10**20, D("3.5"))] == [
        0, 0, 3, 0, 0, 0, MAX_TOKENS, 4]
    u = clamp_usage(ir.Usage(input_tokens=-100, output_tokens=10**19, cache_read_tokens=1.5))  # type: ignore[arg-type]
    assert (u.input_tokens, u.output_tokens, u.cache_read_tokens) == (0, MAX_TOKENS, 2)
    # negative usage can never produce a negative (crediting) cost
    assert SONNET.cost(ir.Usage(input_tokens=-10**9, output_tokens=-1)) == 0
    assert SONNET.cost(ir.Usage(output_tokens=10**30)) == D(15_000)  # saturated at 1e9 tokens


@settings(max_examples=400, deadline=None)
@given(
    tokens=st.lists(st.integers(min_value=0, max_value=MAX_TOKENS), min_size=4, max_size=4),
    prices=st.lists(st.decimals(min_value=0, max_value=1000, places=4), min_size=4, max_size=4),
)
def test_rounding_property(tokens: list[int], prices: list[Decimal]) -> None:
    s = scheme(input=str(prices[0]), output=str(prices[1]), cache_write=str(prices[2]), cache_read=str(prices[3]))
    usage = ir.Usage(input_tokens=tokens[0], output_tokens=tokens[1], cache_write_tokens=tokens[2], cache_read_tokens=tokens[3])
    exact = sum(t * p for t, p in zip(tokens, [prices[0], prices[1], prices[2], prices[3]])) / D(1_000_000)
    cost = s.cost(usage)
    assert cost == cost.quantize(MICRO)  # whole micro-USD
    assert exact <= cost < exact + MICRO  # rounded up, error below one unit
    assert (cost == 0) == (exact == 0)  # a non-zero cost is never charged 0


def test_options_from_toml() -> None:
    text = """
[[upstreams]]
name = "a"
provider = "openai"
[[models]]
name = "m"
upstream = "a"
[models.price]
input = 0.3
output = 1.25
cache_read = 0.075
"""
    cfg = parse_config(tomllib.loads(text), file="t.toml")
    opts = structure_options(PerTokenOptions, cfg.models[0].price.options, file="t.toml", table="models[0].price")
    s = PerTokenScheme(opts)
    assert (s.input, s.output, s.cache_read, s.cache_write) == (D("0.3"), D("1.25"), D("0.075"), D("0.3"))
    assert s.cost(ir.Usage(input_tokens=1_000_000, output_tokens=1_000_000)) == D("1.55")


@pytest.mark.parametrize("raw", [
    {"input": -1},  # a negative price would credit balances
    {"output": "abc"},
    {"inputt": 1},
    {"input": True},
    {"output": 10**7},
    {"cache_read": "nan"},
    {"cache_write": "-0.01"},
])
def test_bad_options_are_refused(raw: dict) -> None:
    with pytest.raises(ConfigError) as exc:
        structure_options(PerTokenOptions, raw, file="t.toml", table="models[0].price")
    assert str(exc.value).startswith("t.toml: models[0].price")


def test_validators_explain_the_problem() -> None:
    for raw, problem in [({"input": D(-1)}, "input must not be negative"), ({"output": D(10**7)}, "output must be at most"),
                         ({"cache_read": D("NaN")}, "cache_read must be a finite number")]:
        with pytest.raises(ValueError, match=problem):
            PerTokenOptions(**raw)


def test_hook_registers_the_scheme_and_entry_points_exist() -> None:
    pm = pluggy.PluginManager("cheapproxy")
    pm.add_hookspecs(hookspecs)
    pm.register(per_token_pricing)
    got: list[type] = []
    pm.hook.register_pricing_schemes(register=got.append)
    assert got == [PerTokenScheme] and PerTokenScheme.name == "per_token"
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="cheapproxy")}
    assert eps["per_token"] == "cheapproxy.default_plugins.per_token_pricing"
    assert eps["sqlite"] == "cheapproxy.default_plugins.sqlite_storage"


# ---- the integer fast path of per_token equals the Decimal path

_prices = st.one_of(
    st.integers(0, 12).flatmap(lambda k: st.decimals(min_value=0, max_value=1_000_000, places=k)),
    st.sampled_from([D("0"), D("0.15"), D("3.00"), D("0.075"), D("15"), D("1E+2"), D("0.0000001"), D("999999.999999")]),
)
_tokens = st.one_of(st.integers(-5, 10**10), st.sampled_from([0, 1, 10**9, 10**9 + 1]))


@settings(max_examples=400, deadline=None)
@given(p=st.tuples(_prices, _prices, st.none() | _prices, st.none() | _prices), t=st.tuples(_tokens, _tokens, _tokens, _tokens))
def test_per_token_fast_path_equals_decimal_path(p, t):
    s = PerTokenScheme(PerTokenOptions(input=p[0], output=p[1], cache_write=p[2], cache_read=p[3]))
    usage = ir.Usage(input_tokens=t[0], output_tokens=t[1], cache_write_tokens=t[2], cache_read_tokens=t[3])
    fast = s.cost(usage)
    slow = PricingScheme.cost(s, usage)
    assert fast == slow and str(fast) == str(slow)
    est = s.estimate_max(input_tokens=max(0, t[0]), max_output_tokens=max(0, t[1]))
    ref = PricingScheme.estimate_max(s, input_tokens=max(0, t[0]), max_output_tokens=max(0, t[1]))
    assert est == ref and str(est) == str(ref)


def test_per_token_fast_path_is_taken_for_ordinary_prices():
    assert SONNET._exact == (100, (300, 1500, 375, 30))
    assert SONNET.cost(ir.Usage(input_tokens=1, output_tokens=1)) == D("0.000018")  # $3 + $15 per 1M tokens
