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

from decimal import Decimal
from typing import Any, Callable

import attrs

from cheapproxy import hookimpl, ir
from cheapproxy.pricing import PricingScheme, check_price

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


@hookimpl
def register_pricing_schemes(register: Callable[[type], None]) -> None:
    register(PerTokenScheme)
