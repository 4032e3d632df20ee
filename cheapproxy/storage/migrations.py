"""SQLite schema as ordered, named migration steps.

``apply_migrations`` runs inside one ``BEGIN IMMEDIATE`` transaction, so two
processes opening the same file at once cannot both apply a step, and a step
that fails leaves the schema as it was.  A step is never edited once released:
schema changes are new steps appended at the end.

Money columns are INTEGER micro-USD (1 USD = 1,000,000).  Timestamps are
ISO-8601 UTC text with microseconds, which sorts chronologically.
"""

from __future__ import annotations

import attrs
import aiosqlite

from ..errors import StorageError


@attrs.frozen
class Migration:
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration("m001_users_and_keys", (
        """CREATE TABLE users (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL UNIQUE,
            balance INTEGER NOT NULL DEFAULT 0,
            held INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            CHECK (held >= 0),
            CHECK (balance >= held)
        )""",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id),
            key_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL DEFAULT '',
            label TEXT,
            restrictions TEXT NOT NULL DEFAULT '{}',
            max_spend INTEGER CHECK (max_spend IS NULL OR max_spend >= 0),
            spent INTEGER NOT NULL DEFAULT 0 CHECK (spent >= 0),
            held INTEGER NOT NULL DEFAULT 0 CHECK (held >= 0),
            expires_at TEXT,
            revoked INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX api_keys_user ON api_keys(user_id)",
        # one row; bumped by every key change so other processes drop their key caches
        "CREATE TABLE keys_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)",
        "INSERT INTO keys_version (id, version) VALUES (1, 0)",
    )),
    Migration("m002_ledger", (
        """CREATE TABLE ledger (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL REFERENCES users(id),
            amount INTEGER NOT NULL,
            kind TEXT NOT NULL,
            reference TEXT NOT NULL,
            balance_after INTEGER NOT NULL CHECK (balance_after >= 0),
            note TEXT,
            created_at TEXT NOT NULL,
            UNIQUE (kind, reference)
        )""",
        "CREATE INDEX ledger_user ON ledger(user_id, id)",
        # append-only: corrections are new rows, never edits
        """CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
           BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END""",
        """CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
           BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END""",
    )),
    Migration("m003_holds_and_usage", (
        """CREATE TABLE holds (
            id TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id),
            key_id TEXT REFERENCES api_keys(id),
            amount INTEGER NOT NULL CHECK (amount >= 0),
            state TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'settled', 'released')),
            created_at TEXT NOT NULL,
            finished_at TEXT
        )""",
        "CREATE INDEX holds_open ON holds(created_at) WHERE state = 'open'",
        """CREATE TABLE usage (
            request_id TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id),
            key_id TEXT,
            model TEXT NOT NULL,
            upstream TEXT,
            protocol TEXT NOT NULL,
            streamed INTEGER NOT NULL,
            status TEXT NOT NULL,
            http_status INTEGER NOT NULL,
            input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            cache_write_tokens INTEGER NOT NULL,
            cache_read_tokens INTEGER NOT NULL,
            reasoning_tokens INTEGER NOT NULL,
            cost INTEGER NOT NULL CHECK (cost >= 0),
            unpaid INTEGER NOT NULL DEFAULT 0 CHECK (unpaid >= 0 AND unpaid <= cost),
            latency_ms INTEGER NOT NULL,
            ttft_ms INTEGER,
            usage_source TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX usage_created ON usage(created_at)",
        "CREATE INDEX usage_user ON usage(user_id, created_at)",
    )),
    Migration("m004_idempotency", (
        """CREATE TABLE idempotency (
            scope TEXT NOT NULL,
            key TEXT NOT NULL,
            request_hash TEXT NOT NULL,
            status INTEGER NOT NULL,
            body BLOB NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (scope, key)
        )""",
        "CREATE INDEX idempotency_created ON idempotency(created_at)",
    )),
    Migration("m005_tasks", (
        """CREATE TABLE tasks (
            id TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id),
            key_id TEXT,
            model TEXT NOT NULL,
            upstream TEXT,
            kind TEXT NOT NULL,
            state TEXT NOT NULL,
            provider_task_id TEXT,
            request TEXT NOT NULL,
            result TEXT,
            usage TEXT,
            cost INTEGER CHECK (cost IS NULL OR cost >= 0),
            error TEXT,
            hold_id TEXT,
            callback_url TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            deadline_at TEXT,
            next_poll_at TEXT,
            attempts INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX tasks_user ON tasks(user_id, created_at)",
        "CREATE INDEX tasks_unfinished ON tasks(next_poll_at) WHERE state IN ('queued', 'running')",
    )),
    Migration("m006_charge_queue", (
        # durable charges not yet applied to users/keys/holds/ledger/usage
        # (see "Charge queue" in sqlite.py): every column of a usage row plus
        # the lease, the amount and the ledger kind.  No index: a commit of a
        # batch writes one or two pages instead of a dozen.
        """CREATE TABLE charge_queue (
            id INTEGER PRIMARY KEY,
            lease_id TEXT NOT NULL,
            want INTEGER NOT NULL CHECK (want >= 0),
            kind TEXT NOT NULL,
            queued_at TEXT NOT NULL,
            request_id TEXT NOT NULL,
            user_id INTEGER NOT NULL,
            key_id TEXT,
            model TEXT NOT NULL,
            upstream TEXT,
            protocol TEXT NOT NULL,
            streamed INTEGER NOT NULL,
            status TEXT NOT NULL,
            http_status INTEGER NOT NULL,
            input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            cache_write_tokens INTEGER NOT NULL,
            cache_read_tokens INTEGER NOT NULL,
            reasoning_tokens INTEGER NOT NULL,
            cost INTEGER NOT NULL,
            unpaid INTEGER NOT NULL,
            latency_ms INTEGER NOT NULL,
            ttft_ms INTEGER,
            usage_source TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
    )),
    Migration("m007_rate_windows", (
        # per-key request and token counts of each second, for rate limits
        # shared by every process on this database (ratelimit.SharedRateLimiter)
        """CREATE TABLE rate_windows (
            key_id TEXT NOT NULL,
            second INTEGER NOT NULL,
            requests INTEGER NOT NULL DEFAULT 0,
            tokens INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (key_id, second)
        ) WITHOUT ROWID""",
    )),
    Migration("m008_rate_windows_second", (
        # the sweeper's rate_prune deletes by second alone: without this it
        # would read every key's rows inside its write transaction
        "CREATE INDEX rate_windows_second ON rate_windows (second)",
    )),
)


async def applied_migrations(db: aiosqlite.Connection) -> list[str]:
    """Names recorded in ``schema_migrations`` (empty before the first open)."""
    rows = await db.execute_fetchall(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    )
    if not rows:
        return []
    return [r[0] for r in await db.execute_fetchall("SELECT name FROM schema_migrations ORDER BY rowid")]


async def apply_migrations(db: aiosqlite.Connection, *, now: str, upto: str | None = None) -> list[str]:
    """Apply pending steps in order (stopping after ``upto`` when given);
    returns the names applied.  ``db`` must be in autocommit mode."""
    known = [m.name for m in MIGRATIONS]
    await db.execute("BEGIN IMMEDIATE")
    try:
        await db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        applied = {r[0] for r in await db.execute_fetchall("SELECT name FROM schema_migrations")}
        unknown = sorted(applied - set(known))
        if unknown:
            raise StorageError(
                f"the database has schema steps this cheapproxy does not know ({', '.join(unknown)}); "
                "it was created by a newer version"
            )
        done: list[str] = []
        for m in MIGRATIONS:
            if m.name not in applied:
                for stmt in m.statements:
                    await db.execute(stmt)
                await db.execute("INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)", (m.name, now))
                done.append(m.name)
            if m.name == upto:
                break
        await db.execute("COMMIT")
    except BaseException:
        await db.execute("ROLLBACK")
        raise
    return done
