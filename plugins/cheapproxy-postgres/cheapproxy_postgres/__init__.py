"""The ``postgresql`` storage backend plugin:
``[server] database = "postgresql://user@host/db"`` (``postgres://`` works too)."""

from __future__ import annotations

from typing import Any, Callable

from cheapproxy import hookimpl

from .storage import PostgresStorage


@hookimpl
def register_storage_backends(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("postgresql", PostgresStorage)
    register("postgres", PostgresStorage)
