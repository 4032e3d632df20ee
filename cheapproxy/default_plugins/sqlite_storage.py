"""The ``sqlite`` storage backend plugin: ``[server] database = "sqlite:///..."``."""

from __future__ import annotations

from typing import Any, Callable

from cheapproxy import hookimpl
from cheapproxy.storage.sqlite import SQLiteStorage


@hookimpl
def register_storage_backends(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("sqlite", SQLiteStorage)
