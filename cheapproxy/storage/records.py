"""Records the SQLite backend adds to the ones in ``storage.base`` (which the
core owns): async task rows, a stored usage row that also carries the unpaid
shortfall, and the atomic idempotency request used by transfers."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any, Callable

import attrs

from .base import UsageRecord

TASK_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_TASK_STATES = frozenset({"succeeded", "failed", "cancelled"})


@attrs.define(kw_only=True)
class TaskRecord:
    """One async (video / image / audio) task and its lifecycle.

    ``request`` / ``result`` / ``usage`` are JSON-able dicts; ``cost`` is what
    was charged (None until settled); datetimes are timezone-aware UTC when
    read back.  ``update_task`` is a compare-and-set on ``state``.
    """

    id: str
    user_id: int
    key_id: str | None = None
    model: str
    upstream: str | None = None
    kind: str = "video"
    state: str = "queued"
    provider_task_id: str | None = None
    request: dict[str, Any] = attrs.Factory(dict)
    result: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    cost: Decimal | None = None
    error: str | None = None
    hold_id: str | None = None
    callback_url: str | None = None
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    deadline_at: dt.datetime | None = None
    next_poll_at: dt.datetime | None = None
    attempts: int = 0

    @property
    def finished(self) -> bool:
        return self.state in FINAL_TASK_STATES


@attrs.define(kw_only=True)
class StoredUsageRecord(UsageRecord):
    """A usage row as read back: ``cost`` is the full price of the request,
    ``unpaid`` the part that could not be charged because the user's balance
    (or the key's spending cap) ran out before settlement."""

    unpaid: Decimal = Decimal(0)


@attrs.frozen(kw_only=True)
class IdempotentWrite:
    """Ask ``SQLiteStorage.transfer`` to store the outcome of a transfer under
    an Idempotency-Key in the same transaction that moves the money.

    ``on_success(sender_balance, receiver_balance)`` and ``on_insufficient()``
    render the ``(status, body)`` to store; a key already stored makes the
    transfer raise ``IdempotentReplay`` without moving anything.
    """

    scope: str
    key: str
    request_hash: str
    on_success: Callable[[Decimal, Decimal], tuple[int, bytes]]
    on_insufficient: Callable[[], tuple[int, bytes]]


class IdempotentReplay(Exception):
    """The Idempotency-Key already has a stored result (maybe for another body)."""

    def __init__(self, request_hash: str, status: int, body: bytes) -> None:
        super().__init__("idempotency key already used")
        self.request_hash = request_hash
        self.status = status
        self.body = body
