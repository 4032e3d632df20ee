"""SQLite storage backend (aiosqlite).

Concurrency model:

* WAL journal, ``synchronous=NORMAL``, ``busy_timeout``, foreign keys on.
* Every write is one ``BEGIN IMMEDIATE`` transaction: it takes SQLite's write
  lock up front, so two processes sharing the file queue on ``busy_timeout``
  instead of failing with SQLITE_BUSY on a read-then-write upgrade.
* Inside one process, writes share one connection behind an asyncio lock (a
  connection has one transaction; interleaving coroutines must not share it).
  File databases read through a second connection, so reads never wait for a
  writer; ``sqlite://:memory:`` uses one connection and the lock for reads too.

Charge queue: a batch of lease charges whose outcome is known without reading
a row (each fits in what this process knows its lease still holds) is
committed as rows of the index-less ``charge_queue`` table and applied to
users, keys, holds, ledger and usage in bulk later -- by a timer, and before
any other write (``_tx``, ``_in_thread_tx``) and any read of money
(``_caught_up``), in whatever process makes it, and at open.

Money is INTEGER micro-USD; Decimal amounts with more than six decimals are
refused rather than rounded.  Settlement policy when the real cost exceeds what
is available (the hold plus the free balance, and the key's remaining spending
cap): charge what is available -- never below zero, never above the cap -- and
record the full cost plus the shortfall in the usage row's ``unpaid`` column.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import sqlite3
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator

import aiosqlite
import orjson
import structlog

from ..errors import StorageError
from .base import InsufficientBalance, KeyRecord, LedgerEntry, UsageRecord, User, charge_lease
from .migrations import apply_migrations
from .records import FINAL_TASK_STATES, IdempotentReplay, IdempotentWrite, StoredUsageRecord, TaskRecord

log = structlog.get_logger("cheapproxy.storage")

MAX_AMOUNT_MICRO = 10**15  # 1e9 USD: the largest single amount accepted
MAX_BALANCE_MICRO = 10**16  # far below int64; a credit that would pass it is refused
UTC = dt.timezone.utc


def to_micro(amount: Decimal | int, what: str = "amount") -> int:
    """Exact Decimal -> integer micro-USD (ValueError if not whole micro-USD)."""
    if isinstance(amount, bool) or not isinstance(amount, (Decimal, int)):
        raise TypeError(f"{what} must be a Decimal")
    d = Decimal(amount)
    if not d.is_finite():
        raise ValueError(f"{what} must be finite")
    if d.adjusted() > 12:
        raise ValueError(f"{what} is too large")
    scaled = d.scaleb(6)
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{what} has more than six decimals")
    n = int(scaled)
    if abs(n) > MAX_AMOUNT_MICRO:
        raise ValueError(f"{what} is too large")
    return n


def from_micro(n: int) -> Decimal:
    return Decimal(n).scaleb(-6)


def _ts(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # naive datetimes are taken as UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def _now() -> str:
    return _ts(dt.datetime.now(UTC))  # type: ignore[return-value]


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _unjson(value: str | None) -> Any:
    return None if value is None else orjson.loads(value)


def parse_url(url: str, base_dir: str | Path = ".") -> Path | None:
    """``sqlite:///rel.db`` (relative to base_dir), ``sqlite:////abs.db``,
    ``sqlite://:memory:`` (None)."""
    if not url.startswith("sqlite://"):
        raise StorageError(f"not a sqlite URL: {url!r}")
    rest = url[len("sqlite://"):]
    if rest in (":memory:", "/:memory:"):
        return None
    if "?" in rest or "#" in rest or not rest.startswith("/") or rest in ("/", "//"):
        raise StorageError(f"invalid sqlite URL {url!r}: use sqlite:///relative/path.db or sqlite:////absolute/path.db")
    if rest.startswith("//"):
        return Path(rest[1:])
    return Path(base_dir) / rest[1:]


class _Rollback(Exception):
    """Abort the current transaction and return a value to the caller."""


_USAGE_COLS = (
    "request_id", "user_id", "key_id", "model", "upstream", "protocol", "streamed", "status", "http_status",
    "input_tokens", "output_tokens", "cache_write_tokens", "cache_read_tokens", "reasoning_tokens",
    "cost", "unpaid", "latency_ms", "ttft_ms", "usage_source", "created_at",
)
_INSERT_USAGE = f"INSERT INTO usage ({', '.join(_USAGE_COLS)}) VALUES ({', '.join('?' * len(_USAGE_COLS))})"
_TASK_COLS = (
    "id", "user_id", "key_id", "model", "upstream", "kind", "state", "provider_task_id", "request", "result",
    "usage", "cost", "error", "hold_id", "callback_url", "created_at", "updated_at", "deadline_at",
    "next_poll_at", "attempts",
)
_TASK_JSON = {"request", "result", "usage"}
_TASK_TIMES = {"created_at", "updated_at", "deadline_at", "next_poll_at"}
_KEY_SELECT = (
    "SELECT k.*, u.name AS user_name FROM api_keys k JOIN users u ON u.id = k.user_id"
)


class SQLiteStorage:
    """The ``sqlite`` storage backend; see the module docstring."""

    # The WAL starts over every checkpoint round (_catch_up), but a burst can
    # still grow its file, which SQLite reuses from the start and never
    # shrinks; with this limit the write that restarts the WAL cuts it back.
    wal_size_limit: int = 64 * 2**20

    def __init__(self, url: str, base_dir: str | Path = ".", *, busy_timeout_seconds: float = 30.0) -> None:
        self.url = url
        self.path = parse_url(url, base_dir)
        self.busy_timeout_ms = int(busy_timeout_seconds * 1000)
        self._db: aiosqlite.Connection | None = None
        self._rdb: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._fast: sqlite3.Connection | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self._ckpt: sqlite3.Connection | None = None  # the checkpointer's own connection
        self._ckpt_guard = threading.Lock()
        # the charge queue (see charge_batch): per lease this process charges,
        # [what it may still queue against the lease, the lease's user id]
        self._lease_room: dict[str, list[int]] = {}
        self._queued = 0  # charges queued since the last fold began
        self._fold_timer: asyncio.TimerHandle | None = None
        self._folder: asyncio.Task[None] | None = None
        self._hurry = asyncio.Event()  # set at close: a fold under way goes on without its pauses

    # ------------------------------------------------------------- lifecycle

    async def _connect(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(str(self.path) if self.path else ":memory:", isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            await db.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
            if self.path is not None:
                rows = await self._enable_wal(db)
                if not rows or str(rows[0][0]).lower() != "wal":
                    raise StorageError(f"cannot enable WAL mode on {self.path}")
            await db.execute("PRAGMA synchronous = NORMAL")
            await db.execute(f"PRAGMA journal_size_limit = {self.wal_size_limit}")
            await db.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            await db.close()
            raise
        return db

    async def _enable_wal(self, db: aiosqlite.Connection) -> Any:
        """``PRAGMA journal_mode = WAL``, retried: when several processes open
        a new database at once, switching its journal mode can answer
        "database is locked" at once, without waiting on busy_timeout
        (SQLite refuses to wait where waiting could deadlock)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.busy_timeout_ms / 1000
        delay = 0.005
        while True:
            try:
                return await db.execute_fetchall("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or loop.time() >= give_up:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def open(self) -> None:
        """Connect and apply pending migrations."""
        if self._db is not None:
            return
        self._hurry.clear()
        try:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = await self._connect()
            async with self._lock:
                await apply_migrations(self._db, now=_now())
            self._rdb = await self._connect() if self.path is not None else self._db
            if self.path is not None:
                self._fast = self._connect_fast()
                self._checkpointer = asyncio.get_running_loop().create_task(self._checkpoint_forever())
            # charges a crashed process queued but never applied
            await self._in_thread_tx(_nothing)
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise StorageError(f"cannot open database {self.url}: {exc}") from None
        except BaseException:
            await self.close()
            raise

    def _connect_fast(self) -> sqlite3.Connection:
        """A connection used directly on the event loop for the hot path's
        short transactions.  It never waits for the write lock
        (busy_timeout 0: a busy database falls back to the threaded path) and
        never checkpoints (the checkpointer does that off the loop)."""
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 0")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute(f"PRAGMA journal_size_limit = {self.wal_size_limit}")
        return conn

    async def _checkpoint_forever(self, every: float = 0.5) -> None:
        """Fold the WAL back into the database from aiosqlite's thread, so the
        loop-side connection's commits stay short."""
        while True:
            await asyncio.sleep(every)
            try:
                await self._checkpoint_round()
            except Exception:  # noqa: BLE001 - retried next round
                pass

    async def _checkpoint_round(self) -> None:
        # on a connection of its own, in a worker thread: a PASSIVE
        # checkpoint never blocks a writer, so the request path's commits go
        # on meanwhile (holding the write lock here used to stall every
        # settlement for the checkpoint's whole duration); then the tail
        await asyncio.get_running_loop().run_in_executor(None, self._checkpoint_once)
        self._catch_up()

    def _catch_up(self) -> None:
        """Checkpoint, here on the loop's own connection, the frames written
        while the threaded checkpoint ran (a short tail).  Nothing of this
        process writes in between, so its next write finds the whole log
        checkpointed and starts the log over.  Without this, under writes
        every millisecond a checkpoint never caught up, the log never
        restarted and its file grew by megabytes a second (190 MB in a 16 s
        benchmark run), slowing every read of the log's index too."""
        fast = self._fast
        if fast is None or self._lock.locked():
            return
        with contextlib.suppress(sqlite3.OperationalError):
            fast.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _checkpoint_once(self) -> None:
        with self._ckpt_guard:  # close() waits for a checkpoint in progress
            if self._fast is None:
                return  # closed meanwhile
            conn = self._ckpt
            if conn is None:
                conn = self._ckpt = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
                conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    async def close(self) -> None:
        if self._fold_timer is not None:
            self._fold_timer.cancel()
            self._fold_timer = None
        if self._folder is not None:
            self._hurry.set()  # the rest of a fold under way at once: no request is waiting on the loop now
            with contextlib.suppress(Exception):
                await self._folder
        if self._db is not None and self._queued:
            try:
                await self._in_thread_tx(_nothing)  # the queue's last charges
            except Exception as exc:  # noqa: BLE001 - the next open applies them
                log.warning("storage.fold_at_close_failed", error=f"{type(exc).__name__}: {exc}")
        fast, self._fast = self._fast, None
        task, self._checkpointer = self._checkpointer, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if fast is not None:
            fast.close()
        with self._ckpt_guard:
            ckpt, self._ckpt = self._ckpt, None
            if ckpt is not None:
                ckpt.close()
        db, rdb, self._db, self._rdb = self._db, self._rdb, None, None
        if rdb is not None and rdb is not db:
            await rdb.close()
        if db is not None:
            await db.close()

    async def ping(self) -> bool:
        """True when the database answers (used by /health)."""
        try:
            rows = await self._read("SELECT 1")
            return bool(rows) and rows[0][0] == 1
        except Exception:  # noqa: BLE001 - health reports, never raises
            return False

    def _writer(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StorageError("storage is not open")
        return self._db

    @staticmethod
    async def _rollback(db: aiosqlite.Connection) -> None:
        try:
            await db.execute("ROLLBACK")
        except sqlite3.OperationalError:
            pass  # nothing was open (BEGIN failed): fine

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        """One BEGIN IMMEDIATE transaction.  Rollbacks are shielded: aiosqlite
        runs statements in order on its thread, so a cancelled caller's
        half-done transaction is always rolled back before the next BEGIN."""
        db = self._writer()
        async with self._lock:
            try:
                await db.execute("BEGIN IMMEDIATE")
            except BaseException as exc:
                await asyncio.shield(self._rollback(db))
                if isinstance(exc, sqlite3.OperationalError):
                    raise StorageError(f"database busy: {exc}") from None
                raise
            try:
                # queued charges first: every write sees balances with them applied
                await db._execute(_fold_sync, db._connection)
                yield db
                await db.execute("COMMIT")
            except BaseException as exc:
                await asyncio.shield(self._rollback(db))
                if isinstance(exc, sqlite3.OperationalError):
                    raise StorageError(f"database error: {exc}") from None
                raise

    async def _caught_up(self) -> None:
        """Apply queued charges (of any process) before a read that shows
        balances, spending, holds, the ledger or usage."""
        if (await self._read("SELECT EXISTS (SELECT 1 FROM charge_queue)"))[0][0]:
            await self._in_thread_tx(_nothing)

    async def _read(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        if self._rdb is None:
            raise StorageError("storage is not open")
        if self._rdb is self._db:  # in-memory: never read another coroutine's open transaction
            async with self._lock:
                return list(await self._rdb.execute_fetchall(sql, params))
        return list(await self._rdb.execute_fetchall(sql, params))

    # ------------------------------------------------------------- users

    @staticmethod
    def _user(r: sqlite3.Row) -> User:
        return User(id=r["id"], name=r["name"], balance=from_micro(r["balance"]), held=from_micro(r["held"]),
                    created_at=_dt(r["created_at"]))

    async def create_user(self, name: str, balance: Decimal = Decimal(0)) -> User:
        """Create a user; a non-zero opening balance is a ``topup`` ledger row."""
        if not isinstance(name, str) or not name or len(name) > 200:
            raise ValueError("a user name must be 1 to 200 characters")
        bal = to_micro(balance, "balance")
        if bal < 0:
            raise ValueError("an opening balance cannot be negative")
        now = _now()
        async with self._tx() as db:
            try:
                cur = await db.execute("INSERT INTO users (name, balance, held, created_at) VALUES (?, ?, 0, ?)",
                                       (name, bal, now))
            except sqlite3.IntegrityError:
                raise ValueError(f"user {name!r} already exists") from None
            uid = cur.lastrowid
            if bal:
                await db.execute(
                    "INSERT INTO ledger (user_id, amount, kind, reference, balance_after, note, created_at)"
                    " VALUES (?, ?, 'topup', ?, ?, 'opening balance', ?)", (uid, bal, f"opening:{uid}", bal, now))
        return User(id=int(uid), name=name, balance=from_micro(bal), held=from_micro(0), created_at=_dt(now))  # type: ignore[arg-type]

    async def get_user(self, name: str) -> User | None:
        await self._caught_up()
        rows = await self._read("SELECT * FROM users WHERE name = ?", (name,))
        return self._user(rows[0]) if rows else None

    async def get_user_by_id(self, user_id: int) -> User | None:
        await self._caught_up()
        rows = await self._read("SELECT * FROM users WHERE id = ?", (user_id,))
        return self._user(rows[0]) if rows else None

    async def list_users(self) -> list[User]:
        await self._caught_up()
        return [self._user(r) for r in await self._read("SELECT * FROM users ORDER BY id")]

    async def count_users(self) -> int:
        return int((await self._read("SELECT COUNT(*) FROM users"))[0][0])

    # ------------------------------------------------------------- keys

    @staticmethod
    def _key(r: sqlite3.Row) -> KeyRecord:
        rs = orjson.loads(r["restrictions"])
        return KeyRecord(
            id=r["id"], user_id=r["user_id"], user_name=r["user_name"], key_hash=r["key_hash"], prefix=r["prefix"],
            label=r["label"], models=rs.get("models"), no_stream=bool(rs.get("no_stream", False)),
            allow_ips=rs.get("allow_ips"), rpm=rs.get("rpm"), tpm=rs.get("tpm"),
            max_spend=None if r["max_spend"] is None else from_micro(r["max_spend"]),
            spent=from_micro(r["spent"]), expires_at=_dt(r["expires_at"]), revoked=bool(r["revoked"]),
            created_at=_dt(r["created_at"]),
        )

    async def create_key(self, key: KeyRecord) -> None:
        """Store a key (hash only, never the secret); bumps ``keys_version``."""
        restrictions = {"models": key.models, "no_stream": key.no_stream, "allow_ips": key.allow_ips,
                        "rpm": key.rpm, "tpm": key.tpm}
        cap = None if key.max_spend is None else to_micro(key.max_spend, "max_spend")
        spent = to_micro(key.spent, "spent")
        if (cap is not None and cap < 0) or spent < 0:
            raise ValueError("max_spend and spent cannot be negative")
        async with self._tx() as db:
            try:
                await db.execute(
                    "INSERT INTO api_keys (id, user_id, key_hash, prefix, label, restrictions, max_spend, spent, held,"
                    " expires_at, revoked, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
                    (key.id, key.user_id, key.key_hash, key.prefix, key.label, _json(restrictions), cap, spent,
                     _ts(key.expires_at), int(key.revoked), _ts(key.created_at) or _now()))
            except sqlite3.IntegrityError:
                raise ValueError("a key with this id or hash already exists, or the user does not exist") from None
            await db.execute("UPDATE keys_version SET version = version + 1 WHERE id = 1")

    async def get_key_by_hash(self, key_hash: str) -> KeyRecord | None:
        rows = await self._read(_KEY_SELECT + " WHERE k.key_hash = ?", (key_hash,))
        return self._key(rows[0]) if rows else None

    async def list_keys(self, user_name: str | None = None) -> list[KeyRecord]:
        await self._caught_up()
        if user_name is None:
            rows = await self._read(_KEY_SELECT + " ORDER BY k.created_at, k.id")
        else:
            rows = await self._read(_KEY_SELECT + " WHERE u.name = ? ORDER BY k.created_at, k.id", (user_name,))
        return [self._key(r) for r in rows]

    async def revoke_key(self, key_id: str) -> bool:
        """Mark revoked; False if no such key."""
        async with self._tx() as db:
            cur = await db.execute("UPDATE api_keys SET revoked = 1 WHERE id = ?", (key_id,))
            if cur.rowcount != 1:
                return False
            await db.execute("UPDATE keys_version SET version = version + 1 WHERE id = 1")
        return True

    async def keys_version(self) -> int:
        return int((await self._read("SELECT version FROM keys_version WHERE id = 1"))[0][0])

    # ------------------------------------------------------------- money

    async def credit(self, user_id: int, amount: Decimal, *, kind: str, reference: str, note: str | None = None) -> Decimal:
        """Add ``amount`` (> 0) with a ledger row; returns the new balance."""
        amt = to_micro(amount)
        if amt <= 0:
            raise ValueError("a credit must be positive")
        async with self._tx() as db:
            rows = await db.execute_fetchall(
                "UPDATE users SET balance = balance + ? WHERE id = ? AND balance + ? <= ? RETURNING balance",
                (amt, user_id, amt, MAX_BALANCE_MICRO))
            if not rows:
                exists = await db.execute_fetchall("SELECT 1 FROM users WHERE id = ?", (user_id,))
                raise ValueError("the balance would exceed the maximum" if exists else f"no user with id {user_id}")
            balance = rows[0][0]
            try:
                await db.execute(
                    "INSERT INTO ledger (user_id, amount, kind, reference, balance_after, note, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)", (user_id, amt, kind, reference, balance, note, _now()))
            except sqlite3.IntegrityError:
                raise ValueError(f"reference {reference!r} was already used for {kind}") from None
        return from_micro(balance)

    async def hold(self, hold_id: str, *, user_id: int, key_id: str | None, amount: Decimal) -> bool:
        """Reserve ``amount`` against the available balance and the key's cap."""
        amt = to_micro(amount)
        if amt < 0:
            raise ValueError("a hold cannot be negative")
        try:
            # one synchronous transaction (a lease rotation on the hot path):
            # no hand-off to aiosqlite's thread per statement
            return bool(await self._in_thread_tx(_hold_sync, hold_id, user_id, key_id, amt, _now()))
        except _Rollback:
            return False

    async def _finish_hold(self, db: aiosqlite.Connection, hold_id: str, state: str) -> sqlite3.Row | None:
        """Compare-and-set open -> ``state``: the exactly-once gate."""
        cur = await db.execute("UPDATE holds SET state = ?, finished_at = ? WHERE id = ? AND state = 'open'",
                               (state, _now(), hold_id))
        if cur.rowcount != 1:
            return None
        return (await db.execute_fetchall("SELECT user_id, key_id, amount FROM holds WHERE id = ?", (hold_id,)))[0]

    async def _insert_usage(self, db: aiosqlite.Connection, record: UsageRecord, cost: int, unpaid: int) -> None:
        try:
            await db.execute(_INSERT_USAGE,
                             _usage_row(record, cost, unpaid, _now()))
        except sqlite3.IntegrityError:
            raise ValueError(f"request {record.request_id!r} already has a usage record") from None

    async def settle(self, hold_id: str, *, cost: Decimal, record: UsageRecord, kind: str = "charge") -> Decimal | None:
        """Finish the hold charging ``cost`` (capped by what is available, the
        shortfall recorded as ``unpaid``); None when already finished."""
        want = to_micro(cost, "cost")
        if want < 0:
            raise ValueError("a cost cannot be negative")
        async with self._tx() as db:
            h = await self._finish_hold(db, hold_id, "settled")
            if h is None:
                return None
            uid, key_id, amount = h["user_id"], h["key_id"], h["amount"]
            if record.user_id != uid:
                raise ValueError("the usage record belongs to another user than the hold")
            u = (await db.execute_fetchall("SELECT balance, held FROM users WHERE id = ?", (uid,)))[0]
            room = amount + (u["balance"] - u["held"])
            if key_id is not None:
                k = (await db.execute_fetchall("SELECT spent, held, max_spend FROM api_keys WHERE id = ?", (key_id,)))[0]
                if k["max_spend"] is not None:
                    room = min(room, k["max_spend"] - k["spent"] - (k["held"] - amount))
            charge = max(0, min(want, room))
            balance = u["balance"] - charge
            await db.execute("UPDATE users SET balance = ?, held = held - ? WHERE id = ?", (balance, amount, uid))
            if key_id is not None:
                await db.execute("UPDATE api_keys SET spent = spent + ?, held = held - ? WHERE id = ?",
                                 (charge, amount, key_id))
            if charge:
                try:
                    await db.execute(
                        "INSERT INTO ledger (user_id, amount, kind, reference, balance_after, note, created_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)", (uid, -charge, kind, record.request_id, balance, record.model, _now()))
                except sqlite3.IntegrityError:
                    raise ValueError(f"request {record.request_id!r} was already charged") from None
            await self._insert_usage(db, record, want, want - charge)
        return from_micro(balance)

    async def _in_thread_tx(self, fn: Any, *args: Any, fold: bool = True) -> Any:
        """Run ``fn(conn, *args)`` as one BEGIN IMMEDIATE transaction entirely
        on aiosqlite's thread: one hand-off instead of one per statement.
        The hot path's transactions use this -- each hand-off to the thread is
        a GIL round trip, which costs more than the SQL itself.  Unless
        ``fold`` is False the charge queue is applied first, in the same
        transaction."""
        db = self._writer()
        if fold:
            fn = _after_fold(fn)

        def run() -> Any:
            conn = db._connection  # aiosqlite's own sqlite3 connection, used on its own thread
            assert conn is not None
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StorageError(f"database busy: {exc}") from None
            try:
                result = fn(conn, *args)
                conn.execute("COMMIT")
                return result
            except BaseException:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.OperationalError:
                    pass
                raise

        done, result = self._fast_tx(fn, *args)
        if done:
            return result
        async with self._lock:
            try:
                return await db._execute(run)
            except sqlite3.OperationalError as exc:
                raise StorageError(f"database error: {exc}") from None

    def _fast_tx(self, fn: Any, *args: Any) -> tuple[bool, Any]:
        """``fn(conn, *args)`` as one short transaction right here on the
        loop's own connection, no thread hand-off: (True, its result), or
        (False, None) when it cannot run now -- an awaited transaction holds
        the connection lock, or another connection holds the write lock (the
        caller then takes the threaded path)."""
        fast = self._fast
        if fast is None or self._lock.locked():
            return False, None
        try:
            fast.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return False, None
        try:
            result = fn(fast, *args)
            fast.execute("COMMIT")
            return True, result
        except BaseException as exc:
            with contextlib.suppress(sqlite3.OperationalError):
                fast.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise StorageError(f"database error: {exc}") from None
            raise

    async def charge_batch(self, items: list[tuple[str, Decimal, UsageRecord, str]]) -> list[tuple[Decimal, Decimal]]:
        """Charge many requests against open *lease* holds in ONE transaction
        (group commit: the hot path's per-request cost).  Each item is
        ``(lease_hold_id, cost, record, kind)``; the charge is taken from the
        lease first, then from the free balance, capped like ``settle`` (the
        shortfall recorded as ``unpaid``); the lease stays open with its
        amount reduced.  Returns, per item, (charged, taken from the lease)."""
        if not items:
            return []
        wants = _wants(items)
        rows = self._queueable(items, wants)
        if rows is not None:
            await self._in_thread_tx(_queue_sync, rows, fold=False)
            return self._queued_ok(items, wants)
        # otherwise the exact path (a lease seen for the first time, or one
        # running short): the queue applied, then this batch, by reading rows
        room = self._lease_room
        out, amounts = await self._in_thread_tx(_charge_batch_sync, items, wants, _now())
        for (lease_id, _, record, _) in items:
            if lease_id in amounts:
                room[lease_id] = [amounts[lease_id], record.user_id]
        return [(from_micro(c), from_micro(f)) for c, f in out]

    def charge_batch_nowait(self, items: list[tuple[str, Decimal, UsageRecord, str]]) -> list[tuple[Decimal, Decimal]] | None:
        """``charge_batch`` without a suspension, for the usual batch: its
        charges appended to the charge queue in one short transaction on the
        loop's own connection, committed when this returns.  None when that
        cannot be done here and now (a lease seen for the first time or
        running short, the database busy): the caller awaits
        ``charge_batch`` instead.  Used by the lease billing for a request
        with no other in flight, whose answer then waits for no loop
        iteration (the end of each response waits for its charge's commit)."""
        if not items:
            return []
        wants = _wants(items)
        rows = self._queueable(items, wants)
        if rows is None:
            return None
        done, _ = self._fast_tx(_queue_sync, rows)
        if not done:
            return None
        return self._queued_ok(items, wants)

    def _queueable(self, items: list[tuple[str, Decimal, UsageRecord, str]], wants: list[int]) -> list[tuple[Any, ...]] | None:
        """The charge-queue rows of ``items`` when every charge fits in what
        this process knows its leases still hold (so the outcome is known
        without reading a row: each is taken whole from its lease), else
        None.  Such a batch is made durable as rows of the charge queue (one
        append to an index-less table: a commit writes a page or two, not the
        dozen that the ledger, usage, holds, users and keys rows with their
        indexes take), and applied to those tables in bulk, by any process,
        before any write and before any read of balances, ledger or usage
        (_fold_sync): no reader sees it missing."""
        room = self._lease_room
        plan: dict[str, int] = {}
        for (lease_id, _, record, _), want in zip(items, wants):
            r = room.get(lease_id)
            if r is None or record.user_id != r[1]:
                return None
            left = plan.get(lease_id, r[0])
            if want > left:
                return None
            plan[lease_id] = left - want
        now = _now()
        return [(lease_id, want, kind, now, *_usage_row(record, want, 0, now))
                for (lease_id, _, record, kind), want in zip(items, wants)]

    def _queued_ok(self, items: list[tuple[str, Decimal, UsageRecord, str]], wants: list[int]) -> list[tuple[Decimal, Decimal]]:
        """After the queue rows of ``items`` committed: what the leases hold
        now, the fold scheduled, and the outcome (each charge taken whole
        from its lease)."""
        room = self._lease_room
        for (lease_id, _, _, _), want in zip(items, wants):
            room[lease_id][0] -= want
        self._queued += len(items)
        self._fold_later()
        return [(from_micro(w), from_micro(w)) for w in wants]

    # the queue is applied at least this often, and at once past this many charges
    fold_every: float = 0.1
    fold_after: int = 256

    def _fold_later(self) -> None:
        if self._queued >= self.fold_after:
            self._fold_now()
        elif self._fold_timer is None:
            self._fold_timer = asyncio.get_running_loop().call_later(self.fold_every, self._fold_now)

    def _fold_now(self) -> None:
        if self._fold_timer is not None:
            self._fold_timer.cancel()
            self._fold_timer = None
        if self._folder is None or self._folder.done():
            self._folder = asyncio.get_running_loop().create_task(self._fold())

    # the background fold applies at most fold_step rows per transaction,
    # fold_pause seconds apart: it runs on the loop's own connection and
    # stalls every request while it runs (~20 µs a row), so one transaction
    # of a whole fold (~200 rows at 2,000 requests a second) held each
    # request in flight for ~4 ms; steps back to back (sleep(0)) still held
    # a request that spans several loop turns for most of it.  Each commit
    # rewrites a dozen pages, so the steps are not smaller than this.
    fold_step: int = 64
    fold_pause: float = 0.002

    async def _fold(self) -> None:
        n, self._queued = self._queued, 0
        try:
            # on the loop's own connection (in aiosqlite's thread the fold
            # fought the loop for the GIL and stalled requests longer), in
            # steps; at most the rows that were queued when it began (rows
            # queued since schedule a fold of their own), so it never chases
            # a busy queue
            left = max(n, 1)
            while left > 0:
                want = min(self.fold_step, left)
                done = await self._in_thread_tx(_fold_some, want, fold=False)
                left -= done
                if done < want:
                    break  # the queue is empty (another process may have applied it)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.fold_pause):
                        await self._hurry.wait()  # at once after close() set it
        except Exception as exc:  # noqa: BLE001 - the rows stay queued: retried, and applied before any read
            self._queued += n
            log.warning("storage.fold_failed", error=f"{type(exc).__name__}: {exc}")
            if self._fold_timer is None and self._db is not None:
                self._fold_timer = asyncio.get_running_loop().call_later(1.0, self._fold_now)
            return
        if self._queued and self._db is not None:
            self._fold_later()  # queued while this fold ran

    async def release(self, hold_id: str, *, record: UsageRecord | None = None) -> bool:
        """Cancel the hold with no charge (writing ``record`` at cost 0)."""
        self._lease_room.pop(hold_id, None)
        return bool(await self._in_thread_tx(_release_sync, hold_id, record, _now()))

    @staticmethod
    async def _unhold(db: aiosqlite.Connection, h: sqlite3.Row) -> None:
        await db.execute("UPDATE users SET held = held - ? WHERE id = ?", (h["amount"], h["user_id"]))
        if h["key_id"] is not None:
            await db.execute("UPDATE api_keys SET held = held - ? WHERE id = ?", (h["amount"], h["key_id"]))

    async def open_holds(self) -> int:
        await self._caught_up()
        return int((await self._read("SELECT COUNT(*) FROM holds WHERE state = 'open'"))[0][0])

    async def release_stale_holds(self, older_than: dt.datetime) -> int:
        """Release open holds created before ``older_than`` (orphans of a crash
        or a lost settlement), except holds of unfinished async tasks."""
        final = tuple(sorted(FINAL_TASK_STATES))
        async with self._tx() as db:
            rows = await db.execute_fetchall(
                "SELECT id FROM holds WHERE state = 'open' AND created_at < ? AND id NOT IN"
                f" (SELECT hold_id FROM tasks WHERE hold_id IS NOT NULL AND state NOT IN ({', '.join('?' * len(final))}))",
                (_ts(older_than), *final))
            for r in rows:
                h = await self._finish_hold(db, r["id"], "released")
                if h is not None:
                    await self._unhold(db, h)
        return len(rows)

    async def transfer(self, *, from_user_id: int, to_user_id: int, amount: Decimal, reference: str,
                       idempotency: IdempotentWrite | None = None) -> tuple[Decimal, Decimal]:
        """Move ``amount`` atomically (both ledger legs share ``reference``).

        With ``idempotency`` the outcome (success or insufficient balance) is
        stored in the same transaction, and a key already stored raises
        ``IdempotentReplay`` instead of moving money again.
        """
        amt = to_micro(amount)
        if amt <= 0:
            raise ValueError("a transfer must be positive")
        if from_user_id == to_user_id:
            raise ValueError("cannot transfer to the same user")
        short = False
        async with self._tx() as db:
            if idempotency is not None:
                rows = await db.execute_fetchall("SELECT request_hash, status, body FROM idempotency WHERE scope = ? AND key = ?",
                                                 (idempotency.scope, idempotency.key))
                if rows:
                    raise IdempotentReplay(rows[0][0], rows[0][1], bytes(rows[0][2]))
            names = dict(await db.execute_fetchall("SELECT id, name FROM users WHERE id IN (?, ?)", (from_user_id, to_user_id)))
            if len(names) != 2:
                raise ValueError("no such user")
            sent = await db.execute_fetchall(
                "UPDATE users SET balance = balance - :a WHERE id = :f AND balance - held >= :a RETURNING balance",
                {"a": amt, "f": from_user_id})
            if not sent:
                short = True
                if idempotency is None:
                    raise InsufficientBalance()
                await self._store_idempotent(db, idempotency, *idempotency.on_insufficient())
            else:
                got = await db.execute_fetchall(
                    "UPDATE users SET balance = balance + ? WHERE id = ? AND balance + ? <= ? RETURNING balance",
                    (amt, to_user_id, amt, MAX_BALANCE_MICRO))
                if not got:
                    raise ValueError("the receiver's balance would exceed the maximum")
                sb, rb = sent[0][0], got[0][0]
                now = _now()
                sql = ("INSERT INTO ledger (user_id, amount, kind, reference, balance_after, note, created_at)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)")
                try:
                    await db.execute(sql, (from_user_id, -amt, "transfer_out", reference, sb, f"to {names[to_user_id]}", now))
                    await db.execute(sql, (to_user_id, amt, "transfer_in", reference, rb, f"from {names[from_user_id]}", now))
                except sqlite3.IntegrityError:
                    raise ValueError(f"transfer reference {reference!r} was already used") from None
                if idempotency is not None:
                    await self._store_idempotent(db, idempotency, *idempotency.on_success(from_micro(sb), from_micro(rb)))
        if short:
            raise InsufficientBalance()
        return from_micro(sb), from_micro(rb)

    @staticmethod
    async def _store_idempotent(db: aiosqlite.Connection, spec: IdempotentWrite, status: int, body: bytes) -> None:
        await db.execute("INSERT INTO idempotency (scope, key, request_hash, status, body, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                         (spec.scope, spec.key, spec.request_hash, status, body, _now()))

    async def get_idempotent(self, scope: str, key: str) -> tuple[str, int, bytes] | None:
        rows = await self._read("SELECT request_hash, status, body FROM idempotency WHERE scope = ? AND key = ?", (scope, key))
        return (rows[0][0], int(rows[0][1]), bytes(rows[0][2])) if rows else None

    async def put_idempotent(self, scope: str, key: str, request_hash: str, status: int, body: bytes) -> bool:
        async with self._tx() as db:
            cur = await db.execute(
                "INSERT OR IGNORE INTO idempotency (scope, key, request_hash, status, body, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (scope, key, request_hash, status, body, _now()))
            return cur.rowcount == 1

    async def prune_idempotency(self, older_than: dt.datetime) -> int:
        """Forget Idempotency-Keys stored before ``older_than`` (Stripe keeps 24 h)."""
        async with self._tx() as db:
            cur = await db.execute("DELETE FROM idempotency WHERE created_at < ?", (_ts(older_than),))
            return cur.rowcount

    # ------------------------------------------------------------- rate limits

    async def rate_take(self, key_id: str, second: int, decide: Any) -> bool:
        """One request of ``key_id`` at ``second`` (wall clock), if
        ``decide(rows)`` admits it: ``rows`` are the key's (second, requests,
        tokens) of the last minute, read in the same write transaction as the
        count, so processes sharing the file take turns."""
        return bool(await self._in_thread_tx(_rate_take_sync, key_id, second, decide, fold=False))

    async def rate_add_tokens(self, key_id: str, second: int, tokens: int) -> None:
        await self._in_thread_tx(_rate_add_sync, key_id, second, tokens, fold=False)

    async def rate_prune(self, before: int) -> int:
        """Forget the counts of seconds up to ``before``."""
        return int(await self._in_thread_tx(_rate_prune_sync, before, fold=False))

    # ------------------------------------------------------------- reports

    @staticmethod
    def _usage(r: sqlite3.Row) -> StoredUsageRecord:
        return StoredUsageRecord(
            request_id=r["request_id"], user_id=r["user_id"], key_id=r["key_id"], model=r["model"],
            upstream=r["upstream"], protocol=r["protocol"], streamed=bool(r["streamed"]), status=r["status"],
            http_status=r["http_status"], input_tokens=r["input_tokens"], output_tokens=r["output_tokens"],
            cache_write_tokens=r["cache_write_tokens"], cache_read_tokens=r["cache_read_tokens"],
            reasoning_tokens=r["reasoning_tokens"], cost=from_micro(r["cost"]), unpaid=from_micro(r["unpaid"]),
            latency_ms=r["latency_ms"], ttft_ms=r["ttft_ms"], usage_source=r["usage_source"],
            created_at=_dt(r["created_at"]),
        )

    async def list_usage(self, *, user_name: str | None = None, since: dt.datetime | None = None,
                         limit: int = 1000) -> list[UsageRecord]:
        """Usage records, newest first."""
        await self._caught_up()
        rows = await self._read(
            "SELECT g.* FROM usage g JOIN users u ON u.id = g.user_id"
            " WHERE (:n IS NULL OR u.name = :n) AND (:s IS NULL OR g.created_at >= :s)"
            " ORDER BY g.created_at DESC, g.rowid DESC LIMIT :l",
            {"n": user_name, "s": _ts(since), "l": max(0, min(int(limit), 1_000_000))})
        return [self._usage(r) for r in rows]

    async def get_usage(self, request_id: str) -> StoredUsageRecord | None:
        await self._caught_up()
        rows = await self._read("SELECT * FROM usage WHERE request_id = ?", (request_id,))
        return self._usage(rows[0]) if rows else None

    async def ledger(self, user_id: int) -> list[LedgerEntry]:
        await self._caught_up()
        rows = await self._read("SELECT * FROM ledger WHERE user_id = ? ORDER BY id", (user_id,))
        return [LedgerEntry(id=r["id"], user_id=r["user_id"], amount=from_micro(r["amount"]), kind=r["kind"],
                            reference=r["reference"], balance_after=from_micro(r["balance_after"]), note=r["note"],
                            created_at=_dt(r["created_at"])) for r in rows]

    # ------------------------------------------------------------- tasks

    @staticmethod
    def _task_value(col: str, value: Any) -> Any:
        if col in _TASK_JSON:
            return _json(value)
        if col in _TASK_TIMES:
            return _ts(value)
        if col == "cost":
            return None if value is None else to_micro(value, "cost")
        return value

    @staticmethod
    def _task(r: sqlite3.Row) -> TaskRecord:
        kw = {c: r[c] for c in _TASK_COLS}
        for c in _TASK_JSON:
            kw[c] = _unjson(kw[c])
        for c in _TASK_TIMES:
            kw[c] = _dt(kw[c])
        kw["cost"] = None if kw["cost"] is None else from_micro(kw["cost"])
        kw["request"] = kw["request"] or {}
        return TaskRecord(**kw)

    async def create_task(self, task: TaskRecord) -> None:
        now = dt.datetime.now(UTC)
        task.created_at = task.created_at or now
        task.updated_at = task.updated_at or now
        values = tuple(self._task_value(c, getattr(task, c)) for c in _TASK_COLS)
        async with self._tx() as db:
            try:
                await db.execute(f"INSERT INTO tasks ({', '.join(_TASK_COLS)}) VALUES ({', '.join('?' * len(_TASK_COLS))})",
                                 values)
            except sqlite3.IntegrityError:
                raise ValueError(f"task {task.id!r} already exists or its user does not") from None

    async def get_task(self, task_id: str) -> TaskRecord | None:
        rows = await self._read("SELECT * FROM tasks WHERE id = ?", (task_id,))
        return self._task(rows[0]) if rows else None

    async def list_tasks(self, *, user_id: int | None = None, unfinished_only: bool = False, limit: int = 200,
                         due_before: dt.datetime | None = None) -> list[TaskRecord]:
        """Tasks newest first; with ``unfinished_only`` / ``due_before`` (for
        pollers) unfinished ones ordered by when they are due."""
        final = tuple(sorted(FINAL_TASK_STATES))
        where, params = ["1 = 1"], []  # type: ignore[var-annotated]
        if user_id is not None:
            where.append("user_id = ?")
            params.append(user_id)
        if unfinished_only or due_before is not None:
            where.append(f"state NOT IN ({', '.join('?' * len(final))})")
            params.extend(final)
        if due_before is not None:
            where.append("(next_poll_at IS NULL OR next_poll_at <= ?)")
            params.append(_ts(due_before))
        order = ("COALESCE(next_poll_at, created_at), id" if unfinished_only or due_before is not None
                 else "created_at DESC, id DESC")
        params.append(max(0, min(int(limit), 100_000)))
        rows = await self._read(f"SELECT * FROM tasks WHERE {' AND '.join(where)} ORDER BY {order} LIMIT ?", params)
        return [self._task(r) for r in rows]

    async def update_task(self, task_id: str, *, expect_state: str | None = None, **fields: Any) -> bool:
        """Compare-and-set: update only if the current state is ``expect_state``."""
        unknown = set(fields) - (set(_TASK_COLS) - {"id", "created_at"})
        if unknown:
            raise ValueError(f"unknown task field(s): {', '.join(sorted(unknown))}")
        fields.setdefault("updated_at", dt.datetime.now(UTC))
        cols = sorted(fields)  # names come from the whitelist above, never from input
        params = [self._task_value(c, fields[c]) for c in cols] + [task_id]
        sql = f"UPDATE tasks SET {', '.join(f'{c} = ?' for c in cols)} WHERE id = ?"
        if expect_state is not None:
            sql += " AND state = ?"
            params.append(expect_state)
        async with self._tx() as db:
            try:
                cur = await db.execute(sql, params)
            except sqlite3.IntegrityError as exc:
                raise ValueError(f"invalid task update: {exc}") from None
            return cur.rowcount == 1


def _rows(conn: sqlite3.Connection, sql: str, params: Any) -> list[sqlite3.Row]:
    return conn.execute(sql, params).fetchall()


def _hold_sync(conn: sqlite3.Connection, hold_id: str, user_id: int, key_id: str | None, amt: int, now: str) -> bool:
    """The body of ``SQLiteStorage.hold``; _Rollback when the balance or the key's cap refuses."""
    cur = conn.execute("UPDATE users SET held = held + :a WHERE id = :u AND balance - held >= :a", {"a": amt, "u": user_id})
    if cur.rowcount != 1:
        raise _Rollback()
    if key_id is not None:
        cur = conn.execute("UPDATE api_keys SET held = held + :a WHERE id = :k AND user_id = :u"
                           " AND (max_spend IS NULL OR spent + held + :a <= max_spend)", {"a": amt, "k": key_id, "u": user_id})
        if cur.rowcount != 1:
            raise _Rollback()
    try:
        conn.execute("INSERT INTO holds (id, user_id, key_id, amount, state, created_at) VALUES (?, ?, ?, ?, 'open', ?)",
                     (hold_id, user_id, key_id, amt, now))
    except sqlite3.IntegrityError:
        raise ValueError(f"hold id {hold_id!r} already exists") from None
    return True


def _release_sync(conn: sqlite3.Connection, hold_id: str, record: UsageRecord | None, now: str) -> bool:
    """The body of ``SQLiteStorage.release``: open -> released (the
    exactly-once gate), the held amounts returned, ``record`` written at 0."""
    cur = conn.execute("UPDATE holds SET state = 'released', finished_at = ? WHERE id = ? AND state = 'open'", (now, hold_id))
    if cur.rowcount != 1:
        return False
    h = conn.execute("SELECT user_id, key_id, amount FROM holds WHERE id = ?", (hold_id,)).fetchone()
    conn.execute("UPDATE users SET held = held - ? WHERE id = ?", (h["amount"], h["user_id"]))
    if h["key_id"] is not None:
        conn.execute("UPDATE api_keys SET held = held - ? WHERE id = ?", (h["amount"], h["key_id"]))
    if record is not None:
        try:
            conn.execute(_INSERT_USAGE,
                         _usage_row(record, 0, 0, now))
        except sqlite3.IntegrityError:
            raise ValueError(f"request {record.request_id!r} already has a usage record") from None
    return True


def _wants(items: list[tuple[str, Decimal, UsageRecord, str]]) -> list[int]:
    """The batch's costs in micro-USD (negative ones refused)."""
    wants = []
    for _, cost, _, _ in items:
        want = to_micro(cost, "cost")
        if want < 0:
            raise ValueError("a cost cannot be negative")
        wants.append(want)
    return wants


def _usage_row(r: UsageRecord, cost: int, unpaid: int, now: str) -> tuple[Any, ...]:
    return (r.request_id, r.user_id, r.key_id, r.model, r.upstream, r.protocol, int(r.streamed), r.status,
            r.http_status, r.input_tokens, r.output_tokens, r.cache_write_tokens, r.cache_read_tokens,
            r.reasoning_tokens, cost, unpaid, r.latency_ms, r.ttft_ms, r.usage_source, _ts(r.created_at) or now)


def _charge_batch_sync(conn: sqlite3.Connection, items: list[tuple[str, Decimal, UsageRecord, str]], wants: list[int],
                       now: str) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """The body of ``SQLiteStorage.charge_batch``'s exact path: the charges
    and, per lease, the amount it still holds afterwards."""
    entries = []
    for (lease_id, _, record, kind), want in zip(items, wants):
        entries.append((lease_id, want, kind, now, _usage_row(record, want, 0, now)))
    return _apply_charges(conn, entries, strict=True)


# a usage row's cost and unpaid columns
_COST, _UNPAID = _USAGE_COLS.index("cost"), _USAGE_COLS.index("unpaid")


def _apply_charges(conn: sqlite3.Connection, entries: list[tuple[str, int, str, str, tuple[Any, ...]]],
                   strict: bool) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """Charge each entry ``(lease_id, want, kind, at, usage_row)`` by the money
    rule of ``charge_lease``, writing its ledger row (dated ``at``) and its usage
    row (cost ``want``, the shortfall as unpaid).  Returns per entry (charged,
    taken from the lease) and per open lease its amount afterwards.

    ``strict`` (a live batch): a lease that is not open, a record of another
    user than its lease or a request already charged raise ValueError, and the
    caller retries item by item.  Not strict (folding the charge queue, where
    nobody is left to retry): a charge whose lease was released meanwhile is
    taken from the free balance alone, and a request already charged is
    skipped -- a charge is applied exactly once, never dropped."""
    lease_ids = sorted({e[0] for e in entries})
    leases = {r["id"]: dict(r) for r in _rows(
        conn, f"SELECT id, user_id, key_id, amount FROM holds WHERE state = 'open' AND id IN ({', '.join('?' * len(lease_ids))})",
        lease_ids)}
    skip: set[int] = set()
    if not strict:
        seen: set[str] = set()
        ids = sorted({e[4][0] for e in entries})
        done = {r[0] for r in _rows(conn, f"SELECT request_id FROM usage WHERE request_id IN ({', '.join('?' * len(ids))})", ids)}
        for n, e in enumerate(entries):
            rid = e[4][0]
            if rid in done or rid in seen:
                skip.add(n)
            seen.add(rid)
    elif len(leases) != len(lease_ids):
        missing = [x for x in lease_ids if x not in leases]
        raise ValueError(f"lease {missing[0]!r} is not open")
    # a lease gone (released by the stale-hold sweeper): nothing left to take from it
    gone = {e[0]: {"amount": 0, "user_id": e[4][1], "key_id": e[4][2]} for e in entries if e[0] not in leases}
    owners = [leases.get(e[0]) or gone[e[0]] for e in entries]
    uids = sorted({h["user_id"] for h in owners})
    users = {r["id"]: dict(r) for r in _rows(
        conn, f"SELECT id, balance, held FROM users WHERE id IN ({', '.join('?' * len(uids))})", uids)}
    kids = sorted({h["key_id"] for h in owners if h["key_id"] is not None})
    keys = {r["id"]: dict(r) for r in _rows(
        conn, f"SELECT id, spent, held, max_spend FROM api_keys WHERE id IN ({', '.join('?' * len(kids))})", kids)} if kids else {}
    ledger_rows, usage_rows, out = [], [], []
    for n, ((_, want, kind, at, row), h) in enumerate(zip(entries, owners)):
        if n in skip:
            out.append((0, 0))
            continue
        if row[1] != h["user_id"]:
            if strict:
                raise ValueError("the usage record belongs to another user than the lease")
            h = {"amount": 0, "user_id": row[1], "key_id": row[2]}  # cannot happen (checked when queued)
        u = users.get(h["user_id"])
        if u is None:  # cannot happen (users are never deleted): keep the queue moving
            out.append((0, 0))
            continue
        k = keys.get(h["key_id"]) if h["key_id"] is not None else None
        charge, from_lease = charge_lease(h, u, k, want)
        if charge:
            ledger_rows.append((h["user_id"], -charge, kind, row[0], u["balance"], row[3], at))
        if charge != want or row[_UNPAID] != 0 or row[_COST] != want:
            row = (*row[:_COST], want, want - charge, *row[_UNPAID + 1:])
        usage_rows.append(row)
        out.append((charge, from_lease))
    conn.executemany("UPDATE holds SET amount = ? WHERE id = ?", [(h["amount"], i) for i, h in leases.items()])
    conn.executemany("UPDATE users SET balance = ?, held = ? WHERE id = ?", [(u["balance"], u["held"], i) for i, u in users.items()])
    if keys:
        conn.executemany("UPDATE api_keys SET spent = ?, held = ? WHERE id = ?", [(k["spent"], k["held"], i) for i, k in keys.items()])
    try:
        if ledger_rows:
            conn.executemany("INSERT INTO ledger (user_id, amount, kind, reference, balance_after, note, created_at)"
                             " VALUES (?, ?, ?, ?, ?, ?, ?)", ledger_rows)
        conn.executemany(_INSERT_USAGE, usage_rows)
    except sqlite3.IntegrityError:
        raise ValueError("a request in the batch was already charged") from None
    return out, {i: h["amount"] for i, h in leases.items()}


# ---------------------------------------------------------------- rate limits

_RATE_WINDOW = 60  # seconds (ratelimit.WINDOW)


def _rate_take_sync(conn: sqlite3.Connection, key_id: str, second: int, decide: Any) -> bool:
    # (older rows are left to rate_prune: deleting here too would make the two writers wait on each other)
    rows = conn.execute("SELECT second, requests, tokens FROM rate_windows WHERE key_id = ? AND second > ?"
                        " ORDER BY second", (key_id, second - _RATE_WINDOW)).fetchall()
    if not decide(rows):
        return False
    conn.execute("INSERT INTO rate_windows (key_id, second, requests, tokens) VALUES (?, ?, 1, 0)"
                 " ON CONFLICT (key_id, second) DO UPDATE SET requests = requests + 1", (key_id, second))
    return True


def _rate_add_sync(conn: sqlite3.Connection, key_id: str, second: int, tokens: int) -> None:
    conn.execute("INSERT INTO rate_windows (key_id, second, requests, tokens) VALUES (?, ?, 0, ?)"
                 " ON CONFLICT (key_id, second) DO UPDATE SET tokens = tokens + excluded.tokens", (key_id, second, tokens))


def _rate_prune_sync(conn: sqlite3.Connection, before: int) -> int:
    return conn.execute("DELETE FROM rate_windows WHERE second <= ?", (before,)).rowcount


# ---------------------------------------------------------------- charge queue

_QUEUE_COLS = ("lease_id", "want", "kind", "queued_at", *_USAGE_COLS)
_SELECT_QUEUE = f"SELECT id, {', '.join(_QUEUE_COLS)} FROM charge_queue ORDER BY id LIMIT ?"
_INSERT_QUEUE = f"INSERT INTO charge_queue ({', '.join(_QUEUE_COLS)}) VALUES ({', '.join('?' * len(_QUEUE_COLS))})"
_FOLD_CHUNK = 500  # rows per statement; an IN list of 500 ids stays under old SQLite's 999 variables


def _queue_sync(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    conn.executemany(_INSERT_QUEUE, rows)


def _fold_sync(conn: sqlite3.Connection) -> int:
    """Apply every queued charge, oldest first, and empty the queue (inside
    the caller's transaction).  Returns how many were applied."""
    total = 0
    while True:
        done = _fold_some(conn, _FOLD_CHUNK)
        total += done
        if done < _FOLD_CHUNK:
            return total


def _fold_some(conn: sqlite3.Connection, limit: int) -> int:
    """Apply the ``limit`` oldest queued charges (inside the caller's
    transaction); the rest stay queued.  Returns how many were applied."""
    rows = conn.execute(_SELECT_QUEUE, (limit,)).fetchall()
    if rows:
        _apply_charges(conn, [(r[1], r[2], r[3], r[4], tuple(r)[5:]) for r in rows], strict=False)
        conn.execute("DELETE FROM charge_queue WHERE id <= ?", (rows[-1][0],))
    return len(rows)


def _after_fold(fn: Any) -> Any:
    def run(conn: sqlite3.Connection, *args: Any) -> Any:
        _fold_sync(conn)
        return fn(conn, *args)
    return run


def _nothing(conn: sqlite3.Connection) -> None:
    """A transaction whose only work is the fold before it."""
