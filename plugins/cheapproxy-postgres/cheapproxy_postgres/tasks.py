"""Async task rows (video / image / audio jobs) for ``PostgresStorage``:
create, read, list for pollers, and the compare-and-set ``update_task``."""

from __future__ import annotations

import datetime as dt
from typing import Any, Awaitable, Callable

import asyncpg

from cheapproxy.storage.records import FINAL_TASK_STATES, TaskRecord

from .rows import TASK_COLS, count, marks, task_row, task_value, ts, utcnow

FINAL = sorted(FINAL_TASK_STATES)


class TaskMethods:
    """Mixed into ``PostgresStorage``, which provides ``_write`` and ``_rows``."""

    _write: Callable[..., Awaitable[Any]]
    _rows: Callable[..., Awaitable[list[asyncpg.Record]]]

    async def create_task(self, task: TaskRecord) -> None:
        now = utcnow()
        task.created_at = task.created_at or now
        task.updated_at = task.updated_at or now
        values = [task_value(c, getattr(task, c)) for c in TASK_COLS]

        async def fn(db: asyncpg.Connection) -> None:
            try:
                await db.execute(f"INSERT INTO tasks ({', '.join(TASK_COLS)}) VALUES ({marks(len(TASK_COLS))})", *values)
            except asyncpg.IntegrityConstraintViolationError:
                raise ValueError(f"task {task.id!r} already exists or its user does not") from None

        await self._write(fn)

    async def get_task(self, task_id: str) -> TaskRecord | None:
        rows = await self._rows("SELECT * FROM tasks WHERE id = $1", task_id)
        return task_row(rows[0]) if rows else None

    async def list_tasks(self, *, user_id: int | None = None, unfinished_only: bool = False, limit: int = 200,
                         due_before: dt.datetime | None = None) -> list[TaskRecord]:
        """Tasks newest first; with ``unfinished_only`` / ``due_before`` (for
        pollers) unfinished ones ordered by when they are due."""
        where, args = ["TRUE"], []  # type: ignore[var-annotated]
        if user_id is not None:
            args.append(user_id)
            where.append(f"user_id = ${len(args)}")
        polling = unfinished_only or due_before is not None
        if polling:
            args.append(FINAL)
            where.append(f"state <> ALL(${len(args)}::text[])")
        if due_before is not None:
            args.append(ts(due_before))
            where.append(f"(next_poll_at IS NULL OR next_poll_at <= ${len(args)})")
        order = "COALESCE(next_poll_at, created_at), id" if polling else "created_at DESC, id DESC"
        args.append(max(0, min(int(limit), 100_000)))
        rows = await self._rows(f"SELECT * FROM tasks WHERE {' AND '.join(where)} ORDER BY {order} LIMIT ${len(args)}",
                                *args)
        return [task_row(r) for r in rows]

    async def update_task(self, task_id: str, *, expect_state: str | None = None, **fields: Any) -> bool:
        """Compare-and-set: update only if the current state is ``expect_state``."""
        unknown = set(fields) - (set(TASK_COLS) - {"id", "created_at"})
        if unknown:
            raise ValueError(f"unknown task field(s): {', '.join(sorted(unknown))}")
        fields.setdefault("updated_at", utcnow())
        cols = sorted(fields)  # names come from the whitelist above, never from input
        args = [task_value(c, fields[c]) for c in cols] + [task_id]
        sql = f"UPDATE tasks SET {', '.join(f'{c} = ${i}' for i, c in enumerate(cols, 1))} WHERE id = ${len(args)}"
        if expect_state is not None:
            args.append(expect_state)
            sql += f" AND state = ${len(args)}"

        async def fn(db: asyncpg.Connection) -> bool:
            try:
                return count(await db.execute(sql, *args)) == 1
            except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as exc:
                raise ValueError(f"invalid task update: {exc}") from None

        return await self._write(fn)
