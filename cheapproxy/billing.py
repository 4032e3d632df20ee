"""Billing: hold an estimate of the maximum cost before forwarding, settle the
hold to the real cost afterwards -- exactly once -- or release it.

The storage backend does the money arithmetic atomically; this module prices
(through the model's ``PricingScheme``), validates bounds, and turns a refused
hold into a 402 a person can act on.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from decimal import Decimal
from typing import Any

import attrs

from . import ir
from .errors import ProxyError
from .pricing import MAX_TOKENS, PricingScheme, clamp_usage, round_charge
from .storage.base import KeyRecord, Storage, UsageRecord


def estimate_input_tokens(body_bytes: int, bytes_per_token: int = 3) -> int:
    """Prompt tokens assumed for a hold: ceil(body bytes / 3).  Real tokenizers
    average about 4 bytes per token for English and JSON, so dividing by 3
    over-holds a little rather than under-holds; the charge uses real usage."""
    if isinstance(body_bytes, bool) or not isinstance(body_bytes, int) or body_bytes < 0:
        raise ValueError("body_bytes must be a non-negative int")
    return min(-(-body_bytes // max(1, bytes_per_token)), MAX_TOKENS)


def local_token_count(text: str) -> int:
    """Tokens billed when the upstream reports no usage: ceil(UTF-8 bytes / 4),
    at least 1 for non-empty text, 0 for empty text."""
    n = len(text.encode("utf-8", "surrogatepass"))
    return min(-(-n // 4), MAX_TOKENS)


def format_usd(amount: Decimal) -> str:
    """$ amount for messages: at least two decimals, at most six, no float."""
    s = f"{amount.quantize(Decimal('0.000001')):f}".rstrip("0")
    whole, _, frac = s.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def _bounded(value: Any, name: str) -> int:
    """Refuse absurd quantities before any arithmetic (CVE-2026-71479 style
    overflows start with an unchecked count)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
        raise ProxyError("invalid_request", f"{name} must be a whole number between 0 and {MAX_TOKENS}.",
                         param="max_tokens" if name == "max_output_tokens" else None)
    return value


@attrs.define(kw_only=True, eq=False)
class Hold:
    """A reservation against a balance.  ``state`` is this object's view:
    ``open``, ``settled``, ``released`` or ``finished`` (ended elsewhere)."""

    id: str
    request_id: str
    user_id: int
    key_id: str | None = None
    amount: Decimal = Decimal(0)
    task: bool = False
    state: str = "open"
    cost: Decimal | None = None  # the settled cost, returned again by a repeated settle
    _lock: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False, repr=False)


class Billing:
    """Reserve, settle and release holds through a storage backend."""

    estimate_input_tokens = staticmethod(estimate_input_tokens)
    local_token_count = staticmethod(local_token_count)

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def reserve(
        self, *, request_id: str, user_id: int, key: KeyRecord | None, scheme: PricingScheme,
        input_tokens_estimate: int, max_output_tokens: int, task: dict[str, Any] | None = None,
    ) -> Hold:
        """Hold the most this call can cost; 402 when the balance or the key's
        spending cap cannot cover it."""
        _bounded(input_tokens_estimate, "input_tokens_estimate")
        _bounded(max_output_tokens, "max_output_tokens")
        is_task = task is not None
        need = round_charge(max(scheme.estimate_max(
            input_tokens=input_tokens_estimate, max_output_tokens=max_output_tokens, task=task), Decimal(0)), task=is_task)
        hold = Hold(id="hold_" + secrets.token_hex(12), request_id=request_id, user_id=user_id,
                    key_id=key.id if key is not None else None, amount=need, task=is_task)
        if await self.storage.hold(hold.id, user_id=user_id, key_id=hold.key_id, amount=need):
            return hold
        raise await self._refusal(user_id, key, need)

    async def _refusal(self, user_id: int, key: KeyRecord | None, need: Decimal) -> ProxyError:
        """Say which limit is short (the balance or the key's cap) and by how much."""
        user = await self.storage.get_user_by_id(user_id)
        available = max(user.balance - user.held, Decimal(0)) if user is not None else Decimal(0)
        if available < need or key is None or key.max_spend is None:
            return ProxyError(
                "insufficient_balance",
                f"Insufficient balance: this request may cost up to ${format_usd(need)} but the available balance is "
                f"${format_usd(available)}. Top up the balance or ask for fewer output tokens (max_tokens).",
                code="insufficient_balance")
        left = max(key.max_spend - key.spent, Decimal(0))
        return ProxyError(
            "insufficient_balance",
            f"This API key's spending cap is reached: this request may cost up to ${format_usd(need)} but the key has "
            f"about ${format_usd(left)} left of its ${format_usd(key.max_spend)} cap (max_spend). "
            "Use another key or ask for a higher cap.",
            code="key_spend_cap")

    async def settle(self, hold: Hold, *, scheme: PricingScheme, usage: ir.Usage, record: UsageRecord,
                     task: dict[str, Any] | None = None) -> Decimal:
        """Charge the real cost of ``usage`` and finish the hold; returns the
        cost.  Exactly once: a repeated call charges nothing and returns the
        first result (0 if the hold was released)."""
        async with hold._lock:
            if hold.state != "open":
                return hold.cost if hold.cost is not None else Decimal(0)
            usage = clamp_usage(usage)
            is_task = task is not None or hold.task
            cost = round_charge(max(scheme.cost(usage, task=task), Decimal(0)), task=is_task)
            record.cost = cost
            # the record must show the usage that was priced, clamped like it
            record.input_tokens, record.output_tokens = usage.input_tokens, usage.output_tokens
            record.cache_read_tokens, record.cache_write_tokens = usage.cache_read_tokens, usage.cache_write_tokens
            record.reasoning_tokens = usage.reasoning_tokens
            extra = {"kind": "task_charge"} if is_task else {}
            balance = await self.storage.settle(hold.id, cost=cost, record=record, **extra)
            if balance is None:  # finished by another process or Hold object
                hold.state, hold.cost = "finished", await self._stored_cost(record.request_id)
            else:
                hold.state, hold.cost = "settled", cost
            return hold.cost

    async def _stored_cost(self, request_id: str) -> Decimal:
        get_usage = getattr(self.storage, "get_usage", None)
        stored = await get_usage(request_id) if get_usage is not None else None
        return stored.cost if stored is not None else Decimal(0)

    async def release(self, hold: Hold, *, record: UsageRecord | None = None) -> bool:
        """Cancel the hold without charge (``record`` is stored at cost 0);
        False when it was already finished."""
        async with hold._lock:
            if hold.state != "open":
                return False
            if record is not None:
                record.cost = Decimal(0)
            ok = await self.storage.release(hold.id, record=record)
            if ok:
                hold.state, hold.cost = "released", Decimal(0)
            else:
                hold.state, hold.cost = "finished", await self._stored_cost(hold.request_id)
            return ok

    async def release_stale(self, ttl_seconds: float, *, now: dt.datetime | None = None) -> int:
        """Release holds older than ``ttl_seconds`` (``[billing] hold_ttl_seconds``)
        left open by a crash; holds of unfinished async tasks are kept."""
        now = now or dt.datetime.now(dt.timezone.utc)
        sweep = getattr(self.storage, "release_stale_holds", None)
        if sweep is None:
            return 0
        return int(await sweep(now - dt.timedelta(seconds=ttl_seconds)))
