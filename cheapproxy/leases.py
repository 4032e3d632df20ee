"""Fast billing for the request path: balance *leases* and group commit.

A per-request database hold plus a per-request settlement transaction cost
more than everything else a gateway does.  Here each process leases a slice
of a key's balance with one ordinary storage hold (so several processes
sharing a database still can never overdraw: the leases themselves are
holds), reserves requests against the lease in memory, and settles finished
requests in batches -- one transaction for every request that finished while
the previous batch was committing (a request with none other in flight is
committed at once, in the same step, when the storage can do that without a
suspension).  The caller awaits its batch, so a charge is durable before the
response ends.

* A lease is ``lease_multiple x need`` (64 request estimates), grown 4x at a
  time up to 16x that while each lease runs out within a second (a lease is
  a transaction); if the larger lease is refused, the plain size and then
  exactly ``need`` are tried, so a small balance still serves its last
  request.
* A lease whose reservations all ended is released after
  ``lease_idle_seconds`` (and at shutdown); a lease older than
  ``max_lease_age`` takes no new reservations, so it is released once its
  last request ends, long before the stale-hold sweeper
  (``[billing] hold_ttl_seconds``, for a crashed process's leases) could
  meet it in use.
* Storage backends without ``charge_batch`` get the plain per-request path.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from decimal import Decimal
from typing import Any

import attrs
import structlog

from . import ir
from .billing import Billing, Hold, _bounded
from .errors import ProxyError
from .pricing import PricingScheme, clamp_usage, round_charge
from .storage.base import KeyRecord, UsageRecord

log = structlog.get_logger("cheapproxy.leases")


@attrs.define(eq=False)
class Lease:
    id: str
    user_id: int
    key_id: str | None
    remaining: Decimal  # what the database still holds for this lease
    reserved: Decimal = Decimal(0)  # reservations in memory against it
    users: int = 0  # open reservations
    idle_handle: Any = None
    created: float = attrs.Factory(time.monotonic)

    @property
    def free(self) -> Decimal:
        return self.remaining - self.reserved


@attrs.define(kw_only=True, eq=False)
class LeaseHold(Hold):
    lease: Lease | None = None


@attrs.define(eq=False)
class _Pending:
    hold: LeaseHold
    cost: Decimal
    record: UsageRecord
    future: asyncio.Future[tuple[Decimal, Decimal]]
    after: Any = None  # called with the cost once the charge is committed


def _price(scheme: PricingScheme, usage: ir.Usage, record: UsageRecord) -> Decimal:
    """The cost of ``usage``, written on ``record`` with the counts it was priced on."""
    usage = clamp_usage(usage)
    cost = round_charge(max(scheme.cost(usage, task=None), Decimal(0)))
    record.cost = cost
    record.input_tokens, record.output_tokens = usage.input_tokens, usage.output_tokens
    record.cache_read_tokens, record.cache_write_tokens = usage.cache_read_tokens, usage.cache_write_tokens
    record.reasoning_tokens = usage.reasoning_tokens
    return cost


class LeaseBilling(Billing):
    def __init__(self, storage: Any, *, lease_multiple: int = 64, lease_idle_seconds: float = 2.0,
                 max_lease_age: float = 300.0) -> None:
        super().__init__(storage)
        self.max_lease_age = max_lease_age
        self.lease_multiple = lease_multiple
        self.lease_idle_seconds = lease_idle_seconds
        self._leases: dict[tuple[int, str | None], list[Lease]] = {}
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        # the storage's commit of a usual batch without a suspension, if any
        self._nowait = getattr(storage, "charge_batch_nowait", None)
        self._lease_lock = asyncio.Lock()
        self._closing = False
        self._open = 0  # reservations not yet unreserved (pending ones included)
        self._loop: asyncio.AbstractEventLoop | None = None
        # per (user, key): the lease size in request estimates, grown while
        # leases run out within lease_grow_within seconds
        self._multiple: dict[tuple[int, str | None], int] = {}

    lease_grow_within = 1.0
    lease_max_growth = 16  # at most lease_multiple x 16 estimates per lease

    @property
    def enabled(self) -> bool:
        return hasattr(self.storage, "charge_batch")

    # ---------------------------------------------------------------- reserve

    async def reserve(self, *, request_id: str, user_id: int, key: KeyRecord | None, scheme: PricingScheme,
                      input_tokens_estimate: int, max_output_tokens: int, task: dict[str, Any] | None = None) -> Hold:
        if task is not None or not self.enabled or self._closing:
            return await super().reserve(request_id=request_id, user_id=user_id, key=key, scheme=scheme,
                                         input_tokens_estimate=input_tokens_estimate,
                                         max_output_tokens=max_output_tokens, task=task)
        _bounded(input_tokens_estimate, "input_tokens_estimate")
        _bounded(max_output_tokens, "max_output_tokens")
        need = round_charge(max(scheme.estimate_max(input_tokens=input_tokens_estimate,
                                                    max_output_tokens=max_output_tokens), Decimal(0)))
        key_id = key.id if key is not None else None
        lease = self._take(user_id, key_id, need)
        if lease is None:
            async with self._lease_lock:
                lease = self._take(user_id, key_id, need)  # another coroutine may have leased meanwhile
                if lease is None:
                    lease = await self._new_lease(user_id, key_id, need)
                    if lease is None:
                        raise await self._refusal(user_id, key, need)
                    lease.reserved += need
                    lease.users += 1
                    self._open += 1
        return LeaseHold(id=lease.id, request_id=request_id, user_id=user_id, key_id=key_id, amount=need, lease=lease)

    def _take(self, user_id: int, key_id: str | None, need: Decimal) -> Lease | None:
        now = time.monotonic()
        # newest first: an older lease of the group was found short once (a
        # newer one exists) and waits only for its last request to end
        for lease in reversed(self._leases.get((user_id, key_id), ())):
            # rotate old leases so the stale-hold sweeper never meets one in use
            if lease.free >= need and now - lease.created < self.max_lease_age:
                lease.reserved += need
                lease.users += 1
                self._open += 1
                if lease.idle_handle is not None:
                    lease.idle_handle.cancel()
                    lease.idle_handle = None
                return lease
        return None

    async def _new_lease(self, user_id: int, key_id: str | None, need: Decimal) -> Lease | None:
        group = (user_id, key_id)
        multiple = self._multiple.get(group, self.lease_multiple)
        last = self._leases.get(group)
        if last and time.monotonic() - last[-1].created < self.lease_grow_within:
            # the last lease lasted under a second: lease more at a time (a
            # lease is a transaction, and at thousands of requests a second
            # 64 estimates last a few milliseconds)
            multiple = min(multiple * 4, self.lease_multiple * self.lease_max_growth)
        self._multiple[group] = multiple
        # the grown size, the plain one, exactly one estimate (each once)
        sizes = list(dict.fromkeys((need * multiple, need * self.lease_multiple, need)))
        for amount in sizes if need > 0 else [Decimal("0.000001")]:
            lid = "lease_" + secrets.token_hex(12)
            if await self.storage.hold(lid, user_id=user_id, key_id=key_id, amount=amount):
                lease = Lease(id=lid, user_id=user_id, key_id=key_id, remaining=amount)
                self._leases.setdefault(group, []).append(lease)
                return lease
            self._multiple[group] = self.lease_multiple  # the balance (or the key's cap) is short: stay small
        return None

    # ---------------------------------------------------------------- settle / release

    async def settle(self, hold: Hold, *, scheme: PricingScheme, usage: ir.Usage, record: UsageRecord,
                     task: dict[str, Any] | None = None) -> Decimal:
        if not isinstance(hold, LeaseHold):
            return await super().settle(hold, scheme=scheme, usage=usage, record=record, task=task)
        async with hold._lock:
            if hold.state != "open":
                return hold.cost if hold.cost is not None else Decimal(0)
            cost = _price(scheme, usage, record)
            await self._submit(hold, cost, record)
            hold.state, hold.cost = "settled", cost
            return cost

    def settle_nowait(self, hold: Hold, *, scheme: PricingScheme, usage: ir.Usage | None, record: UsageRecord,
                      after: Any = None) -> asyncio.Future[tuple[Decimal, Decimal]] | None:
        """The request path's settlement without a task: price ``usage`` (None:
        release at no charge, still writing ``record``), queue the charge for
        the next batch and return the future of its commit.  The batch task
        owns the charge from here: a caller that stops waiting (cancelled)
        loses nothing, and ``after(cost)`` runs once the charge is durable.
        None when this hold needs the general path (not a lease hold, or
        another settlement of it is under way)."""
        if not isinstance(hold, LeaseHold) or hold._lock.locked() or hold.state != "open" or self._closing:
            return None
        if usage is not None:
            cost = _price(scheme, usage, record)
            hold.state = "settled"
        else:
            cost = Decimal(0)
            hold.state = "released"
        record.cost = hold.cost = cost
        return self._queue(hold, cost, record, after)

    async def release(self, hold: Hold, *, record: UsageRecord | None = None) -> bool:
        if not isinstance(hold, LeaseHold):
            return await super().release(hold, record=record)
        async with hold._lock:
            if hold.state != "open":
                return False
            if record is not None:
                record.cost = Decimal(0)
                await self._submit(hold, Decimal(0), record)
            else:
                self._unreserve(hold, Decimal(0))
            hold.state, hold.cost = "released", Decimal(0)
            return True

    async def _submit(self, hold: LeaseHold, cost: Decimal, record: UsageRecord) -> None:
        # a cancelled waiter does not stop the batch: it still commits and unreserves
        await asyncio.shield(self._queue(hold, cost, record, None))

    def _queue(self, hold: LeaseHold, cost: Decimal, record: UsageRecord,
               after: Any) -> asyncio.Future[tuple[Decimal, Decimal]]:
        # the loop of the last batch while it runs (asking asyncio costs a getpid() syscall)
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[Decimal, Decimal]] = loop.create_future()
        self._pending.append(_Pending(hold, cost, record, fut, after))
        if self._flusher is not None and not self._flusher.done():
            return fut  # the batch task under way takes it
        if self._nowait is not None and self._open <= len(self._pending):
            # nothing else in flight, so no other charge could join this
            # batch: commit it here and now (the answer of a request alone
            # then waits for no loop iteration; under load the batch task
            # below gathers the charges of a whole iteration per commit)
            self._commit_alone(loop)
        else:
            self._flusher = loop.create_task(self._flush_loop())
        return fut

    def _commit_alone(self, loop: asyncio.AbstractEventLoop) -> None:
        """Commit the pending batch without a suspension (the storage's
        ``charge_batch_nowait``), or hand it to the batch task when that
        cannot be done now."""
        batch = self._pending
        items = [(p.hold.id, p.cost, p.record, "charge") for p in batch]
        try:
            results = self._nowait(items)
        except Exception:  # noqa: BLE001 - the batch task retries, item by item if need be
            log.debug("billing.commit_alone_failed", exc_info=True)
            results = None
        if results is None:
            self._flusher = loop.create_task(self._flush_loop())
            return
        self._pending = []
        self._committed(batch, results)

    def _committed(self, batch: list[_Pending], results: list[tuple[Decimal, Decimal]]) -> None:
        for p, (charged, from_lease) in zip(batch, results):
            self._unreserve(p.hold, from_lease)
            self._done(p, (charged, from_lease))

    @staticmethod
    def _done(p: _Pending, result: tuple[Decimal, Decimal]) -> None:
        if not p.future.done():
            p.future.set_result(result)
        if p.after is not None:
            try:
                p.after(p.cost)
            except Exception:  # noqa: BLE001 - an observer's bug must not stop the batch
                log.exception("billing.after_charge_failed")

    async def _flush_loop(self) -> None:
        while self._pending:
            if self._open > len(self._pending):
                # other requests are under way: one loop iteration lets those
                # finishing now join this batch -- fewer, larger commits (a
                # commit costs more than a row); alone, commit at once
                await asyncio.sleep(0)
            batch, self._pending = self._pending, []
            items = [(p.hold.id, p.cost, p.record, "charge") for p in batch]
            try:
                results = await self.storage.charge_batch(items)
            except Exception:  # noqa: BLE001 - one bad item must not cost the others their charge
                for p, item in zip(batch, items):
                    await self._settle_alone(p, item)
                continue
            self._committed(batch, results)

    async def _settle_alone(self, p: _Pending, item: tuple[str, Decimal, UsageRecord, str]) -> None:
        """A failed batch is retried item by item; an item whose lease is gone
        (released by the stale-hold sweeper) is charged through a fresh zero
        hold, i.e. from the free balance, so the charge is never dropped."""
        try:
            try:
                (charged, from_lease), = await self.storage.charge_batch([item])
            except ValueError:
                zero = "hold_" + secrets.token_hex(12)
                if not await self.storage.hold(zero, user_id=p.hold.user_id, key_id=p.hold.key_id, amount=Decimal(0)):
                    raise
                await self.storage.settle(zero, cost=p.cost, record=p.record)
                charged, from_lease = p.cost, Decimal(0)
        except Exception as exc:  # noqa: BLE001 - the waiter logs it (or this, when nobody waits)
            self._unreserve(p.hold, Decimal(0))
            if not p.future.done():
                p.future.set_exception(exc)
            else:
                log.error("billing.settle_failed", request_id=p.record.request_id, error=f"{type(exc).__name__}: {exc}")
            return
        self._unreserve(p.hold, from_lease)
        self._done(p, (charged, from_lease))

    def _unreserve(self, hold: LeaseHold, from_lease: Decimal) -> None:
        lease = hold.lease
        if lease is None:
            return
        hold.lease = None
        lease.reserved -= hold.amount
        lease.remaining -= from_lease
        lease.users -= 1
        self._open -= 1
        if lease.users == 0:
            group = self._leases.get((lease.user_id, lease.key_id))
            if lease.remaining <= 0 or self._closing or (group and group[-1] is not lease):
                # spent, or superseded by a newer lease: give the rest back now
                # (idle superseded leases would pile up in the scan of _take)
                self._schedule_release(lease, 0)
            elif lease.idle_handle is None:
                self._schedule_release(lease, self.lease_idle_seconds)

    def _schedule_release(self, lease: Lease, delay: float) -> None:
        loop = asyncio.get_running_loop()
        if lease.idle_handle is not None:
            lease.idle_handle.cancel()
        lease.idle_handle = loop.call_later(delay, lambda: loop.create_task(self._release_lease(lease)))

    async def _release_lease(self, lease: Lease) -> None:
        if lease.users:
            return  # reused meanwhile
        group = self._leases.get((lease.user_id, lease.key_id), [])
        if lease in group:
            group.remove(lease)
            if not group:
                self._leases.pop((lease.user_id, lease.key_id), None)
                self._multiple.pop((lease.user_id, lease.key_id), None)  # idle: start small again
        lease.idle_handle = None
        try:
            await self.storage.release(lease.id)
        except Exception:  # noqa: BLE001 - the sweeper releases it later
            log.exception("billing.lease_release_failed", lease=lease.id)

    async def flush(self) -> None:
        """Commit pending settlements and release every idle lease now."""
        while self._flusher is not None and not self._flusher.done():
            await self._flusher
        for group in list(self._leases.values()):
            for lease in list(group):
                if lease.users == 0:
                    if lease.idle_handle is not None:
                        lease.idle_handle.cancel()
                    await self._release_lease(lease)

    async def close(self) -> None:
        self._closing = True
        await self.flush()

    def open_leases(self) -> int:
        return sum(len(g) for g in self._leases.values())


__all__ = ["LeaseBilling", "Lease", "LeaseHold", "ProxyError"]
