"""PostgreSQL storage backend (asyncpg): several gateway instances, one state.

Concurrency model (READ COMMITTED, one pool per process):

* Every write is one transaction on a pooled connection.  Balance checks are
  conditional updates (``UPDATE ... WHERE balance - held >= $amount``) whose
  returned row is the check: PostgreSQL re-evaluates the WHERE clause on the
  newest row version after waiting for a concurrent writer, so two instances
  can never both pass a check that only one of them fits.
* Exactly-once gates are compare-and-set updates (``WHERE state = 'open'``)
  and unique constraints (ledger references, usage request ids, idempotency
  keys); a second settlement finds no open hold and charges nothing.
* Row locks are always taken in one global order -- holds, then users by id,
  then keys by id -- so transactions never wait on each other in a cycle:
  a transfer locks both users in id order, a lease batch (``charge_batch``)
  locks its holds, users and keys each sorted, the stale-hold sweep skips holds
  another instance is finishing (SKIP LOCKED) and unholds users and keys in id
  order.  Deadlock and serialization errors are still retried (the whole
  transaction, a few times, with jitter), as a safety net.
* Reads run outside transactions on any pooled connection.

Money is BIGINT micro-USD with the SQLite backend's exact conversions and
settlement policy: when the real cost exceeds what is available (the hold plus
the free balance, and the key's remaining spending cap) charge what is there
and record the shortfall as ``unpaid`` on the usage row.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from decimal import Decimal
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import asyncpg

from cheapproxy.errors import StorageError
from cheapproxy.logging import add_secret
from cheapproxy.storage.base import InsufficientBalance, KeyRecord, LedgerEntry, UsageRecord, User, charge_lease
from cheapproxy.storage.records import IdempotentReplay, IdempotentWrite, StoredUsageRecord
from cheapproxy.storage.sqlite import MAX_BALANCE_MICRO, from_micro, to_micro

from .migrations import apply_migrations
from .rows import USAGE_COLS, count, key_row, marks, to_json, ts, usage_row, user_row, utcnow
from .tasks import FINAL, TaskMethods
from .url import PostgresURL, parse_url

T = TypeVar("T")
RATE_WINDOW = 60  # seconds (cheapproxy.ratelimit.WINDOW)
# first key of the advisory lock that serialises one API key's rate-limit checks ("cprl"; the second is hashtext(key id))
RATE_LOCK_CLASS = 0x6370726C
RETRIES = 8  # attempts of a transaction that hit a deadlock or serialization failure
_RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
# the database is unreachable, restarting, out of connections or cancelled the statement
_UNAVAILABLE = (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
                asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InsufficientResourcesError)


class _Rollback(Exception):
    """Abort the current transaction and return ``value`` to the caller."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value


class _Retry(Exception):
    """Run the transaction again (a row it relied on vanished meanwhile)."""


_KEY_SELECT = "SELECT k.*, u.name AS user_name FROM api_keys k JOIN users u ON u.id = k.user_id"
_LEDGER_INSERT = ("INSERT INTO ledger (user_id, amount, kind, reference, balance_after, note, created_at)"
                  " VALUES ($1, $2, $3, $4, $5, $6, $7)")
_USAGE_INSERT = f"INSERT INTO usage ({', '.join(USAGE_COLS)}) VALUES ({marks(len(USAGE_COLS))})"
_USAGE_TYPES = dict.fromkeys(USAGE_COLS, "bigint") | dict.fromkeys(
    ("request_id", "key_id", "model", "upstream", "protocol", "status", "usage_source"), "text") | {
    "streamed": "boolean", "created_at": "timestamptz"}
# charge_batch's writes as ONE statement (one round trip): unnest() turns column arrays into rows.  Every
# row it updates is already locked; WITH ORDINALITY gives ledger ids the batch order of the running balance_after.
_BATCH_WRITE = (
    "WITH h AS (UPDATE holds t SET amount = v.amount FROM unnest($1::text[], $2::bigint[]) AS v(id, amount)"
    " WHERE t.id = v.id), u AS (UPDATE users t SET balance = v.balance, held = v.held"
    " FROM unnest($3::bigint[], $4::bigint[], $5::bigint[]) AS v(id, balance, held) WHERE t.id = v.id),"
    " k AS (UPDATE api_keys t SET spent = v.spent, held = v.held"
    " FROM unnest($6::text[], $7::bigint[], $8::bigint[]) AS v(id, spent, held) WHERE t.id = v.id),"
    " l AS (INSERT INTO ledger (user_id, amount, kind, reference, balance_after, note, created_at)"
    " SELECT uid, amt, knd, ref, bal, note, at FROM unnest($9::bigint[], $10::bigint[], $11::text[], $12::text[],"
    " $13::bigint[], $14::text[], $15::timestamptz[]) WITH ORDINALITY AS v(uid, amt, knd, ref, bal, note, at, o)"
    f" ORDER BY o) INSERT INTO usage ({', '.join(USAGE_COLS)}) SELECT * FROM unnest("
    + ", ".join(f"${n}::{_USAGE_TYPES[c]}[]" for n, c in enumerate(USAGE_COLS, 16)) + ")")


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Row tuples -> one list per column (the arguments of an ``unnest``)."""
    return [list(col) for col in zip(*rows)] if rows else [[] for _ in range(width)]


class PostgresStorage(TaskMethods):
    """The ``postgresql`` storage backend; see the module docstring."""

    def __init__(self, url: str, base_dir: str | Path = ".") -> None:
        # base_dir is part of the factory signature; nothing here is a relative path
        self.options: PostgresURL = parse_url(url)
        self.url = self.options.display  # never the password
        for secret in self.options.secrets:
            add_secret(secret)
        self._pool: asyncpg.Pool | None = None
        self.conflict_retries = 0  # transactions re-run after a deadlock / serialization failure

    # ------------------------------------------------------------- lifecycle

    def _scrub(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        for secret in self.options.secrets:
            text = text.replace(secret, "***")
        return text

    async def open(self) -> None:
        """Create the pool and apply pending migrations (once across instances)."""
        if self._pool is not None:
            return
        o = self.options
        try:
            pool = await asyncpg.create_pool(
                o.dsn, min_size=o.min_size, max_size=o.max_size, server_settings=dict(o.server_settings),
                statement_cache_size=o.statement_cache_size, timeout=o.acquire_timeout)
        except (asyncpg.PostgresError, asyncpg.ClientConfigurationError, ValueError, *_UNAVAILABLE) as exc:
            raise StorageError(f"cannot open database {self.url}: {self._scrub(exc)}") from None
        try:
            async with pool.acquire(timeout=o.acquire_timeout) as conn:
                await apply_migrations(conn, now=utcnow(), schema=o.schema)
        except StorageError:
            await pool.close()
            raise
        except (asyncpg.PostgresError, *_UNAVAILABLE) as exc:
            pool.terminate()
            raise StorageError(f"cannot migrate database {self.url}: {self._scrub(exc)}") from None
        except BaseException:
            pool.terminate()
            raise
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), 10)
        except (asyncio.TimeoutError, *_UNAVAILABLE):
            pool.terminate()  # a connection was never given back: cut it, its transaction rolls back

    async def ping(self) -> bool:
        """True when the database answers (used by /health): within 5 s at
        most, so a saturated pool reports itself instead of stalling the check."""
        try:
            return await self._val("SELECT 1", timeout=min(5.0, self.options.acquire_timeout)) == 1
        except Exception:  # noqa: BLE001 - health reports, never raises
            return False

    def _require(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageError("storage is not open")
        return self._pool

    async def _write(self, fn: Callable[[asyncpg.Connection], Awaitable[T]], isolation: str | None = None) -> T:
        """Run ``fn`` in one transaction (at ``isolation``, default the server's);
        retried whole on deadlock / serialization failure.  A cancelled caller's
        transaction is rolled back (or, if the connection cannot say, the
        connection is closed, which rolls it back)."""
        pool = self._require()
        for attempt in range(RETRIES):
            try:
                async with pool.acquire(timeout=self.options.acquire_timeout) as conn:
                    async with conn.transaction(isolation=isolation):
                        return await fn(conn)
            except _Rollback as rb:
                return rb.value  # type: ignore[no-any-return]
            except (_RETRYABLE + (_Retry,)) as exc:
                self.conflict_retries += 1
                if attempt == RETRIES - 1:
                    raise StorageError(
                        f"database conflict persisted after {RETRIES} attempts: {self._scrub(exc)}") from None
                await asyncio.sleep(random.uniform(0, 0.005 * 2 ** attempt))
            except asyncpg.DataError as exc:  # e.g. a NUL character in text, an integer past 64 bits
                raise ValueError(f"value refused by the database: {exc}") from None
            except TimeoutError:
                raise self._busy() from None
            except _UNAVAILABLE as exc:
                raise StorageError(f"database unavailable: {self._scrub(exc)}") from None
        raise AssertionError("unreachable")

    def _busy(self) -> StorageError:
        o = self.options
        return StorageError(f"no database connection within {o.acquire_timeout:g}s (all {o.max_size} of this process's "
                            "connections busy, or the server slow to accept): raise pool_max_size or pool_timeout")

    async def _rows(self, sql: str, *args: Any, timeout: float | None = None) -> list[asyncpg.Record]:
        if any(isinstance(a, str) and "\x00" in a for a in args):
            return []  # PostgreSQL text cannot hold NUL, so no stored row can match (SQLite answers "none" too)
        try:
            async with self._require().acquire(timeout=timeout or self.options.acquire_timeout) as conn:
                return list(await conn.fetch(sql, *args))
        except asyncpg.DataError as exc:
            raise ValueError(f"value refused by the database: {exc}") from None
        except TimeoutError:
            raise self._busy() from None
        except _UNAVAILABLE as exc:
            raise StorageError(f"database unavailable: {self._scrub(exc)}") from None

    async def _val(self, sql: str, *args: Any, timeout: float | None = None) -> Any:
        rows = await self._rows(sql, *args, timeout=timeout)
        return rows[0][0] if rows else None

    # ------------------------------------------------------------- users

    async def create_user(self, name: str, balance: Decimal = Decimal(0)) -> User:
        """Create a user; a non-zero opening balance is a ``topup`` ledger row."""
        if not isinstance(name, str) or not name or len(name) > 200:
            raise ValueError("a user name must be 1 to 200 characters")
        bal = to_micro(balance, "balance")
        if bal < 0:
            raise ValueError("an opening balance cannot be negative")
        now = utcnow()

        async def fn(db: asyncpg.Connection) -> int:
            try:
                uid = await db.fetchval("INSERT INTO users (name, balance, held, created_at) VALUES ($1, $2, 0, $3)"
                                        " RETURNING id", name, bal, now)
            except asyncpg.UniqueViolationError:
                raise ValueError(f"user {name!r} already exists") from None
            if bal:
                await db.execute(_LEDGER_INSERT, uid, bal, "topup", f"opening:{uid}", bal, "opening balance", now)
            return int(uid)

        uid = await self._write(fn)
        return User(id=uid, name=name, balance=from_micro(bal), held=from_micro(0), created_at=now)

    async def get_user(self, name: str) -> User | None:
        rows = await self._rows("SELECT * FROM users WHERE name = $1", name)
        return user_row(rows[0]) if rows else None

    async def get_user_by_id(self, user_id: int) -> User | None:
        rows = await self._rows("SELECT * FROM users WHERE id = $1", user_id)
        return user_row(rows[0]) if rows else None

    async def list_users(self) -> list[User]:
        return [user_row(r) for r in await self._rows("SELECT * FROM users ORDER BY id")]

    async def count_users(self) -> int:
        return int(await self._val("SELECT COUNT(*) FROM users"))

    # ------------------------------------------------------------- keys

    async def create_key(self, key: KeyRecord) -> None:
        """Store a key (hash only, never the secret); bumps ``keys_version``."""
        restrictions = {"models": key.models, "no_stream": key.no_stream, "allow_ips": key.allow_ips,
                        "rpm": key.rpm, "tpm": key.tpm}
        cap = None if key.max_spend is None else to_micro(key.max_spend, "max_spend")
        spent = to_micro(key.spent, "spent")
        if (cap is not None and cap < 0) or spent < 0:
            raise ValueError("max_spend and spent cannot be negative")

        async def fn(db: asyncpg.Connection) -> None:
            try:
                await db.execute(
                    "INSERT INTO api_keys (id, user_id, key_hash, prefix, label, restrictions, max_spend, spent, held,"
                    " expires_at, revoked, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9, $10, $11)",
                    key.id, key.user_id, key.key_hash, key.prefix, key.label, to_json(restrictions), cap, spent,
                    ts(key.expires_at), bool(key.revoked), ts(key.created_at) or utcnow())
            except (asyncpg.UniqueViolationError, asyncpg.ForeignKeyViolationError):
                raise ValueError("a key with this id or hash already exists, or the user does not exist") from None
            await db.execute("UPDATE keys_version SET version = version + 1 WHERE id = 1")

        await self._write(fn)

    async def get_key_by_hash(self, key_hash: str) -> KeyRecord | None:
        rows = await self._rows(_KEY_SELECT + " WHERE k.key_hash = $1", key_hash)
        return key_row(rows[0]) if rows else None

    async def list_keys(self, user_name: str | None = None) -> list[KeyRecord]:
        if user_name is None:
            rows = await self._rows(_KEY_SELECT + " ORDER BY k.created_at, k.id")
        else:
            rows = await self._rows(_KEY_SELECT + " WHERE u.name = $1 ORDER BY k.created_at, k.id", user_name)
        return [key_row(r) for r in rows]

    async def revoke_key(self, key_id: str) -> bool:
        """Mark revoked; False if no such key."""

        async def fn(db: asyncpg.Connection) -> bool:
            if count(await db.execute("UPDATE api_keys SET revoked = TRUE WHERE id = $1", key_id)) != 1:
                return False
            await db.execute("UPDATE keys_version SET version = version + 1 WHERE id = 1")
            return True

        return await self._write(fn)

    async def keys_version(self) -> int:
        return int(await self._val("SELECT version FROM keys_version WHERE id = 1"))

    # ------------------------------------------------------------- money

    async def credit(self, user_id: int, amount: Decimal, *, kind: str, reference: str, note: str | None = None) -> Decimal:
        """Add ``amount`` (> 0) with a ledger row; returns the new balance."""
        amt = to_micro(amount)
        if amt <= 0:
            raise ValueError("a credit must be positive")

        async def fn(db: asyncpg.Connection) -> int:
            balance = await db.fetchval(
                "UPDATE users SET balance = balance + $1 WHERE id = $2 AND balance + $1 <= $3 RETURNING balance",
                amt, user_id, MAX_BALANCE_MICRO)
            if balance is None:
                exists = await db.fetchval("SELECT 1 FROM users WHERE id = $1", user_id)
                raise ValueError("the balance would exceed the maximum" if exists else f"no user with id {user_id}")
            try:
                await db.execute(_LEDGER_INSERT, user_id, amt, kind, reference, balance, note, utcnow())
            except asyncpg.UniqueViolationError:
                raise ValueError(f"reference {reference!r} was already used for {kind}") from None
            return int(balance)

        return from_micro(await self._write(fn))

    async def hold(self, hold_id: str, *, user_id: int, key_id: str | None, amount: Decimal) -> bool:
        """Reserve ``amount`` against the available balance and the key's cap."""
        amt = to_micro(amount)
        if amt < 0:
            raise ValueError("a hold cannot be negative")

        async def fn(db: asyncpg.Connection) -> bool:
            # the returned row is the check: re-evaluated on the newest version after any concurrent writer
            if await db.fetchval("UPDATE users SET held = held + $1 WHERE id = $2 AND balance - held >= $1 RETURNING 1",
                                 amt, user_id) is None:
                raise _Rollback(False)
            if key_id is not None and await db.fetchval(
                    "UPDATE api_keys SET held = held + $1 WHERE id = $2 AND user_id = $3"
                    " AND (max_spend IS NULL OR spent + held + $1 <= max_spend) RETURNING 1",
                    amt, key_id, user_id) is None:
                raise _Rollback(False)
            try:
                await db.execute("INSERT INTO holds (id, user_id, key_id, amount, state, created_at)"
                                 " VALUES ($1, $2, $3, $4, 'open', $5)", hold_id, user_id, key_id, amt, utcnow())
            except asyncpg.UniqueViolationError:
                raise ValueError(f"hold id {hold_id!r} already exists") from None
            return True

        return await self._write(fn)

    @staticmethod
    async def _finish_hold(db: asyncpg.Connection, hold_id: str, state: str) -> asyncpg.Record | None:
        """Compare-and-set open -> ``state``: the exactly-once gate (a concurrent
        finisher waits on the row lock, then finds it no longer open)."""
        return await db.fetchrow("UPDATE holds SET state = $1, finished_at = $2 WHERE id = $3 AND state = 'open'"
                                 " RETURNING user_id, key_id, amount", state, utcnow(), hold_id)

    async def _insert_usage(self, db: asyncpg.Connection, record: UsageRecord, cost: int, unpaid: int) -> None:
        r = record
        try:
            await db.execute(
                _USAGE_INSERT, r.request_id, r.user_id, r.key_id, r.model, r.upstream, r.protocol, bool(r.streamed),
                r.status, r.http_status, r.input_tokens, r.output_tokens, r.cache_write_tokens, r.cache_read_tokens,
                r.reasoning_tokens, cost, unpaid, r.latency_ms, r.ttft_ms, r.usage_source, ts(r.created_at) or utcnow())
        except asyncpg.UniqueViolationError:
            raise ValueError(f"request {r.request_id!r} already has a usage record") from None

    async def settle(self, hold_id: str, *, cost: Decimal, record: UsageRecord, kind: str = "charge") -> Decimal | None:
        """Finish the hold charging ``cost`` (capped by what is available, the
        shortfall recorded as ``unpaid``); None when already finished."""
        want = to_micro(cost, "cost")
        if want < 0:
            raise ValueError("a cost cannot be negative")

        async def fn(db: asyncpg.Connection) -> int | None:
            h = await self._finish_hold(db, hold_id, "settled")
            if h is None:
                return None
            uid, key_id, amount = h["user_id"], h["key_id"], h["amount"]
            if record.user_id != uid:
                raise ValueError("the usage record belongs to another user than the hold")
            u = await db.fetchrow("SELECT balance, held FROM users WHERE id = $1 FOR NO KEY UPDATE", uid)
            room = amount + (u["balance"] - u["held"])
            if key_id is not None:
                k = await db.fetchrow("SELECT spent, held, max_spend FROM api_keys WHERE id = $1 FOR NO KEY UPDATE", key_id)
                if k["max_spend"] is not None:
                    room = min(room, k["max_spend"] - k["spent"] - (k["held"] - amount))
            charge = max(0, min(want, room))
            balance = u["balance"] - charge
            await db.execute("UPDATE users SET balance = $1, held = held - $2 WHERE id = $3", balance, amount, uid)
            if key_id is not None:
                await db.execute("UPDATE api_keys SET spent = spent + $1, held = held - $2 WHERE id = $3",
                                 charge, amount, key_id)
            if charge:
                try:
                    await db.execute(_LEDGER_INSERT, uid, -charge, kind, record.request_id, balance, record.model, utcnow())
                except asyncpg.UniqueViolationError:
                    raise ValueError(f"request {record.request_id!r} was already charged") from None
            await self._insert_usage(db, record, want, want - charge)
            return int(balance)

        balance = await self._write(fn)
        return None if balance is None else from_micro(balance)

    async def charge_batch(self, items: list[tuple[str, Decimal, UsageRecord, str]]) -> list[tuple[Decimal, Decimal]]:
        """Charge many requests against open *lease* holds in ONE transaction
        (group commit; the SQLite backend's semantics).  Each item is
        ``(lease_hold_id, cost, record, kind)``: the charge comes from the lease
        first, then the free balance, capped like ``settle`` (the shortfall
        recorded as ``unpaid``); the lease stays open with its amount reduced.
        Returns, per item, (charged, taken from the lease)."""
        if not items:
            return []
        wants = [to_micro(cost, "cost") for _, cost, _, _ in items]
        if min(wants) < 0:
            raise ValueError("a cost cannot be negative")

        async def fn(db: asyncpg.Connection) -> list[tuple[int, int]]:
            # lock in the global order (holds, users by id, keys by id) whatever the items' order;
            # COLLATE "C" sorts text ids like Python's sorted(), which the stale-hold sweep uses
            leases = {r["id"]: dict(r) for r in await db.fetch(
                "SELECT id, user_id, key_id, amount FROM holds WHERE id = ANY($1::text[]) AND state = 'open'"
                ' ORDER BY id COLLATE "C" FOR NO KEY UPDATE', sorted({i[0] for i in items}))}
            missing = sorted({i[0] for i in items} - leases.keys())
            if missing:
                raise ValueError(f"lease {missing[0]!r} is not open")  # the whole batch fails, as on SQLite
            users = {r["id"]: dict(r) for r in await db.fetch(
                "SELECT id, balance, held FROM users WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE",
                sorted({h["user_id"] for h in leases.values()}))}
            kids = sorted({h["key_id"] for h in leases.values() if h["key_id"] is not None})
            keys = {r["id"]: dict(r) for r in await db.fetch(
                "SELECT id, spent, held, max_spend FROM api_keys WHERE id = ANY($1::text[])"
                ' ORDER BY id COLLATE "C" FOR NO KEY UPDATE', kids)} if kids else {}
            now = utcnow()
            ledger: list[tuple[Any, ...]] = []
            usage: list[tuple[Any, ...]] = []
            out: list[tuple[int, int]] = []
            for (lease_id, _, r, kind), want in zip(items, wants):
                h = leases[lease_id]
                u = users[h["user_id"]]
                if r.user_id != h["user_id"]:
                    raise ValueError("the usage record belongs to another user than the lease")
                charge, from_lease = charge_lease(h, u, keys.get(h["key_id"]), want)
                if charge:  # a zero charge is a usage row only, as in settle
                    ledger.append((h["user_id"], -charge, kind, r.request_id, u["balance"], r.model, now))
                usage.append((r.request_id, r.user_id, r.key_id, r.model, r.upstream, r.protocol, bool(r.streamed),
                              r.status, r.http_status, r.input_tokens, r.output_tokens, r.cache_write_tokens,
                              r.cache_read_tokens, r.reasoning_tokens, want, want - charge, r.latency_ms, r.ttft_ms,
                              r.usage_source, ts(r.created_at) or now))
                out.append((charge, from_lease))
            try:
                await db.execute(_BATCH_WRITE, list(leases), [h["amount"] for h in leases.values()],
                                 *_columns([(i, u["balance"], u["held"]) for i, u in users.items()], 3),
                                 *_columns([(i, k["spent"], k["held"]) for i, k in keys.items()], 3),
                                 *_columns(ledger, 7), *_columns(usage, len(USAGE_COLS)))
            except asyncpg.UniqueViolationError:
                raise ValueError("a request in the batch was already charged") from None
            return out

        return [(from_micro(c), from_micro(f)) for c, f in await self._write(fn)]

    async def release(self, hold_id: str, *, record: UsageRecord | None = None) -> bool:
        """Cancel the hold with no charge (writing ``record`` at cost 0)."""

        async def fn(db: asyncpg.Connection) -> bool:
            h = await self._finish_hold(db, hold_id, "released")
            if h is None:
                return False
            await db.execute("UPDATE users SET held = held - $1 WHERE id = $2", h["amount"], h["user_id"])
            if h["key_id"] is not None:
                await db.execute("UPDATE api_keys SET held = held - $1 WHERE id = $2", h["amount"], h["key_id"])
            if record is not None:
                await self._insert_usage(db, record, 0, 0)
            return True

        return await self._write(fn)

    async def open_holds(self) -> int:
        return int(await self._val("SELECT COUNT(*) FROM holds WHERE state = 'open'"))

    async def release_stale_holds(self, older_than: dt.datetime) -> int:
        """Release open holds created before ``older_than`` (orphans of a crash
        or a lost settlement), except holds of unfinished async tasks.  Holds
        another instance is finishing right now are skipped, not waited for."""
        cutoff = ts(older_than)

        async def fn(db: asyncpg.Connection) -> int:
            ids = [r["id"] for r in await db.fetch(
                "SELECT id FROM holds WHERE state = 'open' AND created_at < $1 AND id NOT IN"
                " (SELECT hold_id FROM tasks WHERE hold_id IS NOT NULL AND state <> ALL($2::text[]))"
                " ORDER BY id FOR UPDATE SKIP LOCKED", cutoff, FINAL)]
            if not ids:
                return 0
            done = await db.fetch("UPDATE holds SET state = 'released', finished_at = $1 WHERE id = ANY($2::text[])"
                                  " AND state = 'open' RETURNING user_id, key_id, amount", utcnow(), ids)
            per_user: dict[int, int] = {}
            per_key: dict[str, int] = {}
            for h in done:
                per_user[h["user_id"]] = per_user.get(h["user_id"], 0) + h["amount"]
                if h["key_id"] is not None:
                    per_key[h["key_id"]] = per_key.get(h["key_id"], 0) + h["amount"]
            for uid in sorted(per_user):  # users, then keys, each in id order: the global lock order
                await db.execute("UPDATE users SET held = held - $1 WHERE id = $2", per_user[uid], uid)
            for kid in sorted(per_key):
                await db.execute("UPDATE api_keys SET held = held - $1 WHERE id = $2", per_key[kid], kid)
            return len(done)

        return await self._write(fn)

    async def transfer(self, *, from_user_id: int, to_user_id: int, amount: Decimal, reference: str,
                       idempotency: IdempotentWrite | None = None) -> tuple[Decimal, Decimal]:
        """Move ``amount`` atomically (both ledger legs share ``reference``).

        Both user rows are locked in id order (so opposite transfers cannot
        deadlock).  With ``idempotency`` the key's row is inserted first -- a
        concurrent request with the same key waits on it and then replays the
        stored outcome -- and completed with the outcome (success or
        insufficient balance) in the same transaction.
        """
        amt = to_micro(amount)
        if amt <= 0:
            raise ValueError("a transfer must be positive")
        if from_user_id == to_user_id:
            raise ValueError("cannot transfer to the same user")

        async def fn(db: asyncpg.Connection) -> tuple[int, int] | None:
            if idempotency is not None:
                await self._claim_idempotency(db, idempotency)
            rows = await db.fetch("SELECT id, name FROM users WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE",
                                  [from_user_id, to_user_id])
            names = {r["id"]: r["name"] for r in rows}
            if len(names) != 2:
                raise ValueError("no such user")
            sb = await db.fetchval("UPDATE users SET balance = balance - $1 WHERE id = $2 AND balance - held >= $1"
                                   " RETURNING balance", amt, from_user_id)
            if sb is None:
                if idempotency is None:
                    raise InsufficientBalance()
                await self._complete_idempotency(db, idempotency, *idempotency.on_insufficient())
                return None  # committed: the stored answer is "insufficient balance"
            rb = await db.fetchval("UPDATE users SET balance = balance + $1 WHERE id = $2 AND balance + $1 <= $3"
                                   " RETURNING balance", amt, to_user_id, MAX_BALANCE_MICRO)
            if rb is None:
                raise ValueError("the receiver's balance would exceed the maximum")
            now = utcnow()
            try:
                await db.execute(_LEDGER_INSERT, from_user_id, -amt, "transfer_out", reference, sb,
                                 f"to {names[to_user_id]}", now)
                await db.execute(_LEDGER_INSERT, to_user_id, amt, "transfer_in", reference, rb,
                                 f"from {names[from_user_id]}", now)
            except asyncpg.UniqueViolationError:
                raise ValueError(f"transfer reference {reference!r} was already used") from None
            if idempotency is not None:
                await self._complete_idempotency(db, idempotency,
                                                 *idempotency.on_success(from_micro(sb), from_micro(rb)))
            return int(sb), int(rb)

        moved = await self._write(fn)
        if moved is None:
            raise InsufficientBalance()
        return from_micro(moved[0]), from_micro(moved[1])

    @staticmethod
    async def _claim_idempotency(db: asyncpg.Connection, spec: IdempotentWrite) -> None:
        """Insert the key's row (status 0, invisible until commit) or replay the
        stored one.  The unique index makes a concurrent twin wait for us."""
        claimed = await db.fetchval(
            "INSERT INTO idempotency (scope, key, request_hash, status, body, created_at)"
            " VALUES ($1, $2, $3, 0, ''::bytea, $4)"
            " ON CONFLICT (scope, key) DO NOTHING RETURNING 1", spec.scope, spec.key, spec.request_hash, utcnow())
        if claimed is None:
            # READ COMMITTED: this statement sees the twin's committed row
            row = await db.fetchrow("SELECT request_hash, status, body FROM idempotency WHERE scope = $1 AND key = $2",
                                    spec.scope, spec.key)
            if row is None:  # pruned between the two statements
                raise _Retry()
            raise IdempotentReplay(row["request_hash"], int(row["status"]), bytes(row["body"]))

    @staticmethod
    async def _complete_idempotency(db: asyncpg.Connection, spec: IdempotentWrite, status: int, body: bytes) -> None:
        await db.execute("UPDATE idempotency SET status = $1, body = $2 WHERE scope = $3 AND key = $4",
                         status, body, spec.scope, spec.key)

    async def get_idempotent(self, scope: str, key: str) -> tuple[str, int, bytes] | None:
        rows = await self._rows("SELECT request_hash, status, body FROM idempotency WHERE scope = $1 AND key = $2",
                                scope, key)
        return (rows[0]["request_hash"], int(rows[0]["status"]), bytes(rows[0]["body"])) if rows else None

    async def put_idempotent(self, scope: str, key: str, request_hash: str, status: int, body: bytes) -> bool:
        async def fn(db: asyncpg.Connection) -> bool:
            return await db.fetchval(
                "INSERT INTO idempotency (scope, key, request_hash, status, body, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (scope, key) DO NOTHING RETURNING 1",
                scope, key, request_hash, status, body, utcnow()) == 1

        return await self._write(fn)

    async def prune_idempotency(self, older_than: dt.datetime) -> int:
        """Forget Idempotency-Keys stored before ``older_than`` (Stripe keeps 24 h)."""

        async def fn(db: asyncpg.Connection) -> int:
            return count(await db.execute("DELETE FROM idempotency WHERE created_at < $1", ts(older_than)))

        return await self._write(fn)

    # ------------------------------------------------------------- rate limits

    async def rate_take(self, key_id: str, second: int, decide: Any) -> bool:
        """One request of ``key_id`` at ``second`` (wall clock), if
        ``decide(rows)`` admits it: ``rows`` are the key's (second, requests,
        tokens) of the last minute.  An advisory lock per key, taken before
        the rows are read, makes instances take turns for the same key."""

        async def fn(db: asyncpg.Connection) -> bool:
            await db.execute("SELECT pg_advisory_xact_lock($1::int4, hashtext($2::text))", RATE_LOCK_CLASS, key_id)
            # (a statement of its own: a snapshot taken before the lock was granted could miss a commit)
            # (older rows are left to rate_prune: deleting them here could deadlock with it)
            rows = await db.fetch(
                "SELECT second, requests, tokens FROM rate_windows WHERE key_id = $1 AND second > $2 ORDER BY second",
                key_id, second - RATE_WINDOW)
            if not decide([tuple(r) for r in rows]):
                return False
            await db.execute("INSERT INTO rate_windows (key_id, second, requests, tokens) VALUES ($1, $2, 1, 0)"
                             " ON CONFLICT (key_id, second) DO UPDATE SET requests = rate_windows.requests + 1",
                             key_id, second)
            return True

        # READ COMMITTED whatever the server's default: each statement sees what
        # committed before it, so the read after the lock sees the last holder's count
        return await self._write(fn, isolation="read_committed")

    async def rate_add_tokens(self, key_id: str, second: int, tokens: int) -> None:
        async def fn(db: asyncpg.Connection) -> None:
            await db.execute("INSERT INTO rate_windows (key_id, second, requests, tokens) VALUES ($1, $2, 0, $3)"
                             " ON CONFLICT (key_id, second) DO UPDATE SET tokens = rate_windows.tokens + excluded.tokens",
                             key_id, second, tokens)

        await self._write(fn)

    async def rate_prune(self, before: int) -> int:
        """Forget the counts of seconds up to ``before``."""

        async def fn(db: asyncpg.Connection) -> int:
            return count(await db.execute("DELETE FROM rate_windows WHERE second <= $1", before))

        return await self._write(fn)

    # ------------------------------------------------------------- reports

    async def list_usage(self, *, user_name: str | None = None, since: dt.datetime | None = None,
                         limit: int = 1000) -> list[UsageRecord]:
        """Usage records, newest first."""
        where, args = ["TRUE"], []  # type: ignore[var-annotated]
        if user_name is not None:
            args.append(user_name)
            where.append(f"u.name = ${len(args)}")
        if since is not None:
            args.append(ts(since))
            where.append(f"g.created_at >= ${len(args)}")
        args.append(max(0, min(int(limit), 1_000_000)))
        rows = await self._rows(
            f"SELECT g.* FROM usage g JOIN users u ON u.id = g.user_id WHERE {' AND '.join(where)}"
            f" ORDER BY g.created_at DESC, g.seq DESC LIMIT ${len(args)}", *args)
        return [usage_row(r) for r in rows]

    async def get_usage(self, request_id: str) -> StoredUsageRecord | None:
        rows = await self._rows("SELECT * FROM usage WHERE request_id = $1", request_id)
        return usage_row(rows[0]) if rows else None

    async def ledger(self, user_id: int) -> list[LedgerEntry]:
        rows = await self._rows("SELECT * FROM ledger WHERE user_id = $1 ORDER BY id", user_id)
        return [LedgerEntry(id=r["id"], user_id=r["user_id"], amount=from_micro(r["amount"]), kind=r["kind"],
                            reference=r["reference"], balance_after=from_micro(r["balance_after"]), note=r["note"],
                            created_at=r["created_at"]) for r in rows]
