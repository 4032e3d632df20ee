"""The default pricing scheme, ``per_token``: USD per 1M tokens.

```toml
[models.price]          # scheme = "per_token" is the default
input = 3.00            # uncached input tokens
output = 15.00          # output tokens (reasoning tokens are part of output)
cache_write = 3.75      # tokens written to the prompt cache; default: the input price
cache_read = 0.30       # tokens read from the prompt cache; default: the input price
```

Policy decisions:

* ``cache_write`` / ``cache_read`` left out are charged at the ``input`` price:
  cache tokens are never free unless the operator says so (``= 0``), and a
  model without cache prices is billed as if the cache did not exist.
* The hold prices every estimated input token at the highest of the input,
  cache-write and cache-read prices (the estimate cannot know which bucket the
  upstream will report), plus ``max_output_tokens`` at the output price.
* Async tasks (CONTRACT section 7): every token the provider reports
  (input + output + cache) counts as ``output``; the tasks module passes its
  token estimate for the hold as ``max_output_tokens``.
"""

from __future__ import annotations

from decimal import Decimal, localcontext
from typing import Any, Callable

import attrs

from cheapproxy import hookimpl, ir
from cheapproxy.pricing import _EXACT, MAX_CHARGE, MICRO, PricingScheme, check_price, clamp_tokens, clamp_usage

PER = Decimal(1_000_000)


@attrs.frozen(kw_only=True)
class PerTokenOptions:
    input: Decimal = attrs.field(default=Decimal(0), validator=check_price)
    output: Decimal = attrs.field(default=Decimal(0), validator=check_price)
    cache_write: Decimal | None = attrs.field(default=None, validator=check_price)
    cache_read: Decimal | None = attrs.field(default=None, validator=check_price)


class PerTokenScheme(PricingScheme):
    """USD per 1M tokens for input, output, cache write and cache read."""

    name = "per_token"
    options_class = PerTokenOptions

    def __init__(self, options: PerTokenOptions | None = None) -> None:
        super().__init__(options if options is not None else PerTokenOptions())
        o = self.options
        self.input = o.input
        self.output = o.output
        self.cache_write = o.input if o.cache_write is None else o.cache_write
        self.cache_read = o.input if o.cache_read is None else o.cache_read
        self._exact = _integer_prices((self.input, self.output, self.cache_write, self.cache_read))

    # Requests are priced on every call: with the prices turned into integers
    # once (scaled by 10**places), a cost is integer arithmetic and one ceiling
    # division to whole micro-USD -- the same result as the Decimal path
    # (tests/test_pricing.py compares them), several times cheaper.

    def cost(self, usage: ir.Usage, *, task: dict[str, Any] | None = None) -> Decimal:
        if task is not None or self._exact is None:
            return super().cost(usage, task=task)
        scale, (p_in, p_out, p_cw, p_cr) = self._exact
        u = clamp_usage(usage)
        scaled = (u.input_tokens * p_in + u.output_tokens * p_out + u.cache_write_tokens * p_cw
                  + u.cache_read_tokens * p_cr)
        return _micro_ceiling(scaled, scale)

    def estimate_max(self, *, input_tokens: int, max_output_tokens: int, task: dict[str, Any] | None = None) -> Decimal:
        if task is not None or self._exact is None:
            return super().estimate_max(input_tokens=input_tokens, max_output_tokens=max_output_tokens, task=task)
        scale, (p_in, p_out, p_cw, p_cr) = self._exact
        scaled = clamp_tokens(input_tokens) * max(p_in, p_cw, p_cr) + clamp_tokens(max_output_tokens) * p_out
        return _micro_ceiling(scaled, scale)

    def raw_estimate_max(self, *, input_tokens: int, max_output_tokens: int, task: dict[str, Any] | None) -> Decimal:
        if task is not None:
            return (input_tokens + max_output_tokens) * self.output / PER
        in_price = max(self.input, self.cache_write, self.cache_read)
        return (input_tokens * in_price + max_output_tokens * self.output) / PER

    def raw_cost(self, usage: ir.Usage, *, task: dict[str, Any] | None) -> Decimal:
        if task is not None:
            total = usage.input_tokens + usage.output_tokens + usage.cache_read_tokens + usage.cache_write_tokens
            return total * self.output / PER
        return (
            usage.input_tokens * self.input
            + usage.output_tokens * self.output
            + usage.cache_write_tokens * self.cache_write
            + usage.cache_read_tokens * self.cache_read
        ) / PER

    def describe(self) -> dict[str, Any]:
        return {
            "scheme": self.name,
            "unit": "USD per 1M tokens",
            "input": str(self.input),
            "output": str(self.output),
            "cache_write": str(self.cache_write),
            "cache_read": str(self.cache_read),
        }


def _integer_prices(prices: tuple[Decimal, ...]) -> tuple[int, tuple[int, ...]] | None:
    """(10**places, the prices times that) when every price converts exactly."""
    places = max(0, *(-int(p.as_tuple().exponent) for p in prices))
    if places > 30:
        return None
    scale = 10**places
    with localcontext(_EXACT):
        ints = tuple(int(p * scale) for p in prices)
        if any(Decimal(i) / scale != p for i, p in zip(ints, prices)):
            return None
    return scale, ints


_MAX_MICRO = int(MAX_CHARGE * 1_000_000)


def _micro_ceiling(scaled: int, scale: int) -> Decimal:
    """USD from a cost in micro-USD x ``scale``: rounded up to a whole micro-USD
    and saturated like ``round_charge``."""
    micro = -(-scaled // scale)
    if micro <= 0:
        return Decimal("0.000000")
    if micro >= _MAX_MICRO:
        return MAX_CHARGE.quantize(MICRO)
    return Decimal(micro).scaleb(-6)


@hookimpl
def register_pricing_schemes(register: Callable[[type], None]) -> None:
    register(PerTokenScheme)
