"""The ``per_second_by_resolution`` pricing scheme: USD per second of output,
by output resolution (async video and audio tasks).

```toml
[models.price]
scheme = "per_second_by_resolution"
[models.price.per_second]      # resolution -> USD per output second
"480p" = 0.05
"720p" = 0.10
"1080p" = 0.30
# "1792x1024" = 0.50           # an exact WIDTHxHEIGHT wins over its class
# default = 0.10               # anything not listed (and tasks without a resolution, e.g. audio)
```

Policy decisions:

* The price is looked up by the exact ``WIDTHxHEIGHT`` size (when the task
  has one), then the resolution (``720p``), then the resolution class of the
  size (its shorter side rounded up to a standard ``Np``: ``1280x720`` ->
  ``720p``, ``1024x1792`` -> ``1080p``), then ``default``.
* A request for a resolution that is not priced (and no ``default``) is
  refused at submit (400).  An *output* resolution the table does not list
  (the provider chose it) is charged at the highest price in the table, so a
  task is never free by omission.
* Seconds are the output seconds the provider reports (whole seconds, rounded
  up), else the requested duration.  Charges round half-up to cents with a
  minimum of $0.01 (``cheapproxy.pricing.round_charge``, CONTRACT section 7).
* Only tasks can be priced per second: a chat or embedding model using this
  scheme is refused at startup.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from decimal import Decimal
from typing import Any, Callable, ClassVar

import attrs

from cheapproxy import hookimpl, ir
from cheapproxy.pricing import PricingScheme, check_price
from cheapproxy.tasks.base import resolution_of

_KEY = re.compile(r"^(\d{3,4}p|[1-8]k|\d{2,5}x\d{2,5}|default)$")


def _check_table(inst: Any, attribute: attrs.Attribute, value: dict[str, Decimal]) -> None:  # type: ignore[type-arg]
    if not value:
        raise ValueError("per_second needs at least one resolution, e.g. \"720p\" = 0.10")
    for key, price in value.items():
        if not _KEY.match(key):
            raise ValueError(f"per_second key {key!r} must be a resolution like \"720p\", a size like "
                             "\"1280x720\", or \"default\"")
        check_price(inst, SimpleNamespace(name=f"per_second.{key}"), price)  # type: ignore[arg-type]


def _lower_keys(value: dict[str, Decimal]) -> dict[str, Decimal]:
    return {str(k).strip().lower(): v for k, v in value.items()}


@attrs.frozen(kw_only=True)
class PerSecondOptions:
    per_second: dict[str, Decimal] = attrs.field(converter=_lower_keys, validator=_check_table)


class TaskOnlyScheme(ValueError):
    """The scheme was asked to price something that is not a task."""


class PerSecondByResolutionScheme(PricingScheme):
    """USD per output second, by resolution (see the module docstring)."""

    name: ClassVar[str] = "per_second_by_resolution"
    options_class: ClassVar[type] = PerSecondOptions
    task_unit: ClassVar[str] = "seconds"  # what a task must report to be priced

    def __init__(self, options: PerSecondOptions) -> None:
        super().__init__(options)
        self.table = dict(options.per_second)

    def _keys(self, task: dict[str, Any]) -> list[str]:
        size = task.get("size") if isinstance(task.get("size"), str) else None
        res = task.get("resolution") if isinstance(task.get("resolution"), str) else None
        keys = [k for k in (size, res, resolution_of(size)) if k]
        return [k.lower() for k in keys]

    def priced_key(self, task: dict[str, Any]) -> str | None:
        """The table key that prices ``task`` (None: not listed, no default)."""
        for k in self._keys(task):
            if k in self.table:
                return k
        return "default" if "default" in self.table else None

    def price_per_second(self, task: dict[str, Any]) -> Decimal:
        key = self.priced_key(task)
        return self.table[key] if key is not None else max(self.table.values())

    def check_task(self, task: dict[str, Any]) -> None:
        """Refuse (ValueError) a request for a resolution the table does not price."""
        if self.priced_key(task) is None and self._keys(task):
            asked = task.get("resolution") or task.get("size")
            priced = ", ".join(sorted(self.table))
            raise ValueError(f"resolution {asked!r} is not offered for this model (priced: {priced})")

    @staticmethod
    def _seconds(task: dict[str, Any], *names: str) -> int:
        for n in names:
            v = task.get(n)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        raise ValueError("a per-second price needs the output duration in seconds")

    def raw_estimate_max(self, *, input_tokens: int, max_output_tokens: int, task: dict[str, Any] | None) -> Decimal:
        if task is None:
            raise TaskOnlyScheme("per_second_by_resolution prices async tasks only")
        return self._seconds(task, "duration") * self.price_per_second(task)

    def raw_cost(self, usage: ir.Usage, *, task: dict[str, Any] | None) -> Decimal:
        if task is None:
            raise TaskOnlyScheme("per_second_by_resolution prices async tasks only")
        return self._seconds(task, "seconds", "duration") * self.price_per_second(task)

    def describe(self) -> dict[str, Any]:
        return {"scheme": self.name, "unit": "USD per output second",
                "per_second": {k: str(v) for k, v in sorted(self.table.items())}}


@hookimpl
def register_pricing_schemes(register: Callable[[type], None]) -> None:
    register(PerSecondByResolutionScheme)
