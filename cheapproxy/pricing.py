"""Pricing schemes: turn token usage (or a task's reported usage) into USD.

A scheme is registered through ``register_pricing_schemes`` and configured by
``[models.price]`` (``scheme = "..."`` plus its own keys, structured into
``options_class``).  Subclasses implement ``raw_cost`` / ``raw_estimate_max``
with exact Decimal arithmetic; the public ``cost`` / ``estimate_max`` sanitise
the inputs and apply the single rounding rule, ``round_charge``.
"""

from __future__ import annotations

import abc
import math
from decimal import ROUND_CEILING, ROUND_HALF_UP, Context, Decimal, InvalidOperation, localcontext
from typing import Any, ClassVar

import attrs

from . import ir

MICRO = Decimal("0.000001")  # money is stored as integer micro-USD
CENT = Decimal("0.01")
MAX_TOKENS = 10**9  # any single token count (usage, estimate, max_tokens) saturates here
MAX_CHARGE = Decimal(1_000_000_000)  # USD; no hold or charge is ever larger (saturating)
MAX_PRICE = Decimal(1_000_000)  # USD per 1M tokens (or per unit); larger prices are refused

# wide enough that tokens (<= 1e9) x prices (<= 1e6, <= 40 digits) are exact
_EXACT = Context(prec=100, rounding=ROUND_CEILING, traps=[InvalidOperation])


def round_charge(amount: Decimal, *, task: bool = False) -> Decimal:
    """The one rounding rule for money charged or held.

    * Requests: round UP to a whole micro-USD (ceiling), so a non-zero usage at
      a non-zero price is never charged 0, and the error per request is below
      one micro-USD, always in the operator's favour.
    * Async tasks (CONTRACT section 7: "task charges are rounded to two
      decimals"): round half-up to whole cents, but a non-zero cost is never
      rounded down to 0 (it becomes $0.01).

    Negative amounts become 0 (a charge can never credit a balance); amounts
    above ``MAX_CHARGE`` saturate there.  NaN / infinities raise ValueError.
    """
    if not isinstance(amount, Decimal):
        raise TypeError("money must be a Decimal")
    if not amount.is_finite():
        raise ValueError("a cost must be a finite number")
    if amount <= 0:
        return Decimal("0.000000") if not task else Decimal("0.00")
    if amount >= MAX_CHARGE:
        return MAX_CHARGE.quantize(CENT if task else MICRO)
    # the context is passed, not entered: ``with localcontext()`` costs more
    # than the rounding, and this runs twice per request
    if task:
        cents = amount.quantize(CENT, rounding=ROUND_HALF_UP, context=_EXACT)
        return cents if cents > 0 else CENT
    return amount.quantize(MICRO, rounding=ROUND_CEILING, context=_EXACT)


def clamp_tokens(value: Any) -> int:
    """A token count from an upstream, made safe: non-numbers, bools and
    negatives count as 0, fractions round up, anything huge saturates at
    ``MAX_TOKENS``."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return min(max(value, 0), MAX_TOKENS)
    if isinstance(value, float) and math.isfinite(value):
        return min(max(math.ceil(value), 0), MAX_TOKENS)
    if isinstance(value, Decimal) and value.is_finite():
        return min(max(int(value.to_integral_value(rounding=ROUND_CEILING)), 0), MAX_TOKENS)
    return 0


def clamp_usage(usage: ir.Usage) -> ir.Usage:
    """``usage`` with every count passed through ``clamp_tokens``: ``usage``
    itself when every count already is a plain int in range (the usual case,
    checked inline: it runs more than once per request), else a copy.
    Callers only read the result."""
    i, o, cr, cw, r = (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens,
                       usage.cache_write_tokens, usage.reasoning_tokens)
    if (type(i) is int and type(o) is int and type(cr) is int and type(cw) is int and type(r) is int
            and 0 <= i <= MAX_TOKENS and 0 <= o <= MAX_TOKENS and 0 <= cr <= MAX_TOKENS
            and 0 <= cw <= MAX_TOKENS and 0 <= r <= MAX_TOKENS):
        return usage
    return ir.Usage(
        input_tokens=clamp_tokens(usage.input_tokens),
        output_tokens=clamp_tokens(usage.output_tokens),
        cache_read_tokens=clamp_tokens(usage.cache_read_tokens),
        cache_write_tokens=clamp_tokens(usage.cache_write_tokens),
        reasoning_tokens=clamp_tokens(usage.reasoning_tokens),
    )


def check_price(inst: Any, attribute: attrs.Attribute, value: Any) -> None:  # type: ignore[type-arg]
    """attrs validator for a price option: a finite Decimal in 0..MAX_PRICE
    (a negative price would credit balances: refused at startup)."""
    if value is None:
        return
    if not isinstance(value, Decimal) or not value.is_finite():
        raise ValueError(f"{attribute.name} must be a finite number")
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative")
    if value > MAX_PRICE:
        raise ValueError(f"{attribute.name} must be at most {MAX_PRICE}")
    if len(value.as_tuple().digits) > 40:
        raise ValueError(f"{attribute.name} has too many digits")


@attrs.frozen(kw_only=True)
class NoOptions:
    """Options class of a scheme that takes no keys."""


class PricingScheme(abc.ABC):
    """Base class of pricing schemes.

    ``name`` is the ``[models.price] scheme`` value; ``options_class`` is an
    attrs class for the scheme's own TOML keys (unknown keys are refused by the
    config loader).  ``task`` is the async task's request dict (``duration``,
    ``resolution``, ...) when pricing a task, else None.
    """

    name: ClassVar[str] = ""
    options_class: ClassVar[type] = NoOptions

    def __init__(self, options: Any) -> None:
        self.options = options

    def estimate_max(self, *, input_tokens: int, max_output_tokens: int, task: dict[str, Any] | None = None) -> Decimal:
        """The most this call can cost (the amount held before forwarding)."""
        with localcontext(_EXACT):
            raw = self.raw_estimate_max(
                input_tokens=clamp_tokens(input_tokens), max_output_tokens=clamp_tokens(max_output_tokens), task=task
            )
        return round_charge(raw, task=task is not None)

    def cost(self, usage: ir.Usage, *, task: dict[str, Any] | None = None) -> Decimal:
        """The price of ``usage``, rounded by ``round_charge`` (never negative)."""
        with localcontext(_EXACT):
            raw = self.raw_cost(clamp_usage(usage), task=task)
        return round_charge(raw, task=task is not None)

    @abc.abstractmethod
    def raw_estimate_max(self, *, input_tokens: int, max_output_tokens: int, task: dict[str, Any] | None) -> Decimal:
        """Unrounded worst-case cost; inputs are already clamped to 0..MAX_TOKENS."""

    @abc.abstractmethod
    def raw_cost(self, usage: ir.Usage, *, task: dict[str, Any] | None) -> Decimal:
        """Unrounded exact cost of ``usage`` (already clamped)."""

    def describe(self) -> dict[str, Any]:
        """Prices for ``/v1/models/info`` (money as decimal strings)."""
        return {"scheme": self.name}
