"""The storage interface.  A backend (registered through
``register_storage_backends``) implements every method of ``Storage``.

Money is ``Decimal`` everywhere (stored as integer micro-USD or exact decimal
text by the backend, never binary floats).  Every balance change is a ledger
row with a unique ``reference``; the balance always equals the sum of the
user's ledger; a reference can never be applied twice (unique constraint).

Holds: ``hold`` atomically checks ``balance - held >= amount`` (and the key's
``max_spend`` against ``spent + held``) and reserves ``amount``; ``settle`` and
``release`` finish a hold exactly once (a second call is a no-op returning
None / False).
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any, Protocol

import attrs


@attrs.define(kw_only=True)
class User:
    id: int
    name: str
    balance: Decimal
    held: Decimal = Decimal(0)
    created_at: dt.datetime | None = None


@attrs.define(kw_only=True)
class KeyRecord:
    id: str  # public id, e.g. "key_ab12cd34"; never the secret
    user_id: int
    user_name: str = ""
    key_hash: str  # sha256 hex of the secret
    prefix: str = ""  # first chars of the secret, for recognition in listings
    label: str | None = None
    models: list[str] | None = None  # globs; None = all
    no_stream: bool = False
    allow_ips: list[str] | None = None  # CIDRs; None = any
    rpm: int | None = None
    tpm: int | None = None
    max_spend: Decimal | None = None
    spent: Decimal = Decimal(0)
    expires_at: dt.datetime | None = None
    revoked: bool = False
    created_at: dt.datetime | None = None


@attrs.define(kw_only=True)
class UsageRecord:
    request_id: str
    user_id: int
    key_id: str | None
    model: str
    upstream: str | None
    protocol: str
    streamed: bool
    status: str  # "ok", "error", "incomplete", "cancelled"
    http_status: int = 200
    input_tokens: int = 0
    output_tokens: int = 0
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    reasoning_tokens: int = 0
    cost: Decimal = Decimal(0)
    latency_ms: int = 0
    ttft_ms: int | None = None
    usage_source: str = "upstream"  # "upstream" | "estimated" (local count when upstream gave none)
    created_at: dt.datetime | None = None


@attrs.define(kw_only=True)
class LedgerEntry:
    id: int
    user_id: int
    amount: Decimal  # signed: + credit, - debit
    kind: str  # topup, charge, transfer_in, transfer_out, refund, task_charge
    reference: str
    balance_after: Decimal
    note: str | None = None
    created_at: dt.datetime | None = None


class Storage(Protocol):
    """What the core needs from a backend.  All methods are coroutines."""

    async def open(self) -> None:
        """Connect and apply pending migrations."""

    async def close(self) -> None: ...

    async def ping(self) -> bool:
        """True when the database answers (used by /health)."""

    # users -----------------------------------------------------------------
    async def create_user(self, name: str, balance: Decimal = Decimal(0)) -> User:
        """Create a user; a non-zero opening balance is a ``topup`` ledger row.
        Raises ValueError if the name exists."""

    async def get_user(self, name: str) -> User | None: ...

    async def get_user_by_id(self, user_id: int) -> User | None: ...

    async def list_users(self) -> list[User]: ...

    async def count_users(self) -> int: ...

    # keys ------------------------------------------------------------------
    async def create_key(self, key: KeyRecord) -> None: ...

    async def get_key_by_hash(self, key_hash: str) -> KeyRecord | None: ...

    async def list_keys(self, user_name: str | None = None) -> list[KeyRecord]: ...

    async def revoke_key(self, key_id: str) -> bool:
        """Mark revoked; False if no such key."""

    async def keys_version(self) -> int:
        """A counter bumped by every key change (create/revoke), so other
        processes sharing the database can invalidate their key caches."""

    # money -----------------------------------------------------------------
    async def credit(self, user_id: int, amount: Decimal, *, kind: str, reference: str, note: str | None = None) -> Decimal:
        """Add ``amount`` (> 0) with a ledger row; returns the new balance.
        A reference already used raises ValueError."""

    async def hold(self, hold_id: str, *, user_id: int, key_id: str | None, amount: Decimal) -> bool:
        """Reserve ``amount`` if the user's available balance and the key's
        spending cap cover it; False (nothing reserved) otherwise."""

    async def settle(self, hold_id: str, *, cost: Decimal, record: UsageRecord, kind: str = "charge") -> Decimal | None:
        """Finish the hold: charge ``cost`` (ledger row of ``kind``, ``charge``
        or ``task_charge``, reference = record.request_id), release the rest,
        add the charge to the key's ``spent``, write the usage record -- all in
        one transaction.  When ``cost`` exceeds what is available (hold + free
        balance, key cap) only that is charged and the shortfall is recorded as
        ``unpaid`` on the usage row.  Returns the new balance, or None when the
        hold was already finished."""

    async def release(self, hold_id: str, *, record: UsageRecord | None = None) -> bool:
        """Cancel the hold with no charge (and write ``record`` if given).
        False when already finished."""

    async def open_holds(self) -> int:
        """Number of holds not yet settled or released."""

    async def release_stale_holds(self, older_than: dt.datetime) -> int:
        """Release open holds created before ``older_than`` (orphans of a crash
        or a lost settlement), except holds of unfinished async tasks."""

    async def get_usage(self, request_id: str) -> UsageRecord | None:
        """The stored usage record of a request, or None."""

    async def transfer(
        self, *, from_user_id: int, to_user_id: int, amount: Decimal, reference: str, idempotency: Any = None
    ) -> tuple[Decimal, Decimal]:
        """Atomically move ``amount``; returns (sender balance, receiver balance).
        Raises InsufficientBalance when the sender's available balance is short.
        With ``idempotency`` (records.IdempotentWrite) the outcome is stored in
        the same transaction, so a retried request moves money once."""

    async def get_idempotent(self, scope: str, key: str) -> tuple[str, int, bytes] | None:
        """A stored (request hash, status, body) for an Idempotency-Key, or None."""

    async def put_idempotent(self, scope: str, key: str, request_hash: str, status: int, body: bytes) -> bool:
        """Store the first result for a key; False if one is already stored."""

    async def prune_idempotency(self, older_than: dt.datetime) -> int:
        """Forget idempotency records stored before ``older_than``."""

    # rate limits shared by processes (ratelimit.SharedRateLimiter) --------------
    async def rate_take(self, key_id: str, second: int, decide: Any) -> bool:
        """In one transaction that processes take in turns per key: read the
        key's ``(second, requests, tokens)`` rows of the 60 seconds up to
        ``second``, and when ``decide(rows)`` is true count one request at
        ``second``.  Returns what ``decide`` said."""

    async def rate_add_tokens(self, key_id: str, second: int, tokens: int) -> None:
        """Add ``tokens`` to the key's count at ``second``."""

    async def rate_prune(self, before: int) -> int:
        """Delete the counts of seconds up to ``before``; returns how many rows."""

    async def list_usage(self, *, user_name: str | None = None, since: dt.datetime | None = None, limit: int = 1000) -> list[UsageRecord]: ...

    async def ledger(self, user_id: int) -> list[LedgerEntry]: ...

    # async tasks (used by the tasks module) -------------------------------
    async def create_task(self, task: Any) -> None: ...

    async def get_task(self, task_id: str) -> Any | None: ...

    async def list_tasks(self, *, user_id: int | None = None, unfinished_only: bool = False, limit: int = 200,
                         due_before: dt.datetime | None = None) -> list[Any]:
        """Tasks (records.TaskRecord), newest first; unfinished ones (for the
        poller) in the order they are due."""

    async def update_task(self, task_id: str, *, expect_state: str | None = None, **fields: Any) -> bool:
        """Compare-and-set: update only if the current state is ``expect_state``
        (when given).  True if a row changed."""


class InsufficientBalance(Exception):
    """Raised by ``transfer`` when the sender cannot cover the amount."""


def charge_lease(lease: dict[str, Any], user: dict[str, Any], key: dict[str, Any] | None, want: int) -> tuple[int, int]:
    """The money rule of ``charge_batch``, for every backend: charge ``want``
    (integer micro-USD) from the lease first, then from the user's free
    balance, capped by what both can cover and by the key's remaining
    ``max_spend``; the rows (plain dicts read in the batch's transaction) are
    updated in place.  Returns (charged, taken from the lease); the shortfall
    ``want - charged`` is recorded as unpaid by the caller."""
    room = lease["amount"] + (user["balance"] - user["held"])
    if key is not None and key["max_spend"] is not None:
        room = min(room, key["max_spend"] - key["spent"] - (key["held"] - lease["amount"]))
    charge = max(0, min(want, room))
    from_lease = min(charge, lease["amount"])
    lease["amount"] -= from_lease
    user["balance"] -= charge
    user["held"] -= from_lease
    if key is not None:
        key["spent"] += charge
        key["held"] -= from_lease
    return charge, from_lease
