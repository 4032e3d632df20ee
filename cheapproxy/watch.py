"""Interrupt request handlers that wait on an upstream.

aiohttp runs handlers with ``handler_cancellation=False`` (serve.py): a
handler learns that its client left only when it next writes.  A handler
blocked on a slow or stalled upstream would keep the upstream busy (and its
pool slot) until a timeout.  The watcher polls the waiting handlers' client
transports every ``[server] disconnect_check_seconds`` (one timer for all of
them, not one per request) and interrupts a handler whose client is gone; at
shutdown it interrupts every handler still serving after the grace period.

An interrupt is a task cancellation whose reason is written on the call first
(``call.interrupt``); the handler absorbs it with :func:`absorb` where it can
act on it (close the upstream, drain, or write the protocol's stream error),
so a cancellation that is *not* ours (server teardown) still propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

CLIENT_GONE = "client_gone"
SHUTDOWN = "shutdown"


class CallWatcher:
    """Registry of handlers waiting on upstreams, checked on one shared timer."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._entries: dict[asyncio.Task[Any], tuple[Any, Any]] = {}
        self._runner: asyncio.Task[None] | None = None
        self.interrupted = 0  # handlers interrupted since start (tests, metrics)

    def __len__(self) -> int:
        return len(self._entries)

    def watching(self, request: Any, call: Any) -> "_Watching":
        """``with``: while inside, a vanished client (or shutdown) interrupts
        this task.  (A plain object, not a generator: it runs on every request.)"""
        return _Watching(self, request, call)

    def unwatch(self) -> None:
        """The current task knows its client is gone (a write failed): no
        interrupt may cut the drain that follows."""
        task = asyncio.current_task()
        if task is not None:
            self._entries.pop(task, None)

    def _interrupt(self, task: asyncio.Task[Any], call: Any, reason: str) -> None:
        self._entries.pop(task, None)
        if call.interrupt is None and not task.done():
            call.interrupt = reason
            self.interrupted += 1
            task.cancel()

    def interrupt_all(self, reason: str = SHUTDOWN) -> int:
        """Interrupt every watched handler (shutdown after the grace period)."""
        entries = list(self._entries.items())
        for task, (_, call) in entries:
            self._interrupt(task, call, reason)
        return len(entries)

    async def _run(self) -> None:
        # exits when nothing is watched; the next watching() starts it again
        while self._entries:
            await asyncio.sleep(self.interval)
            for task, (request, call) in list(self._entries.items()):
                transport = request.transport
                if transport is None or transport.is_closing():
                    self._interrupt(task, call, CLIENT_GONE)

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None and not runner.done():
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    async def idle(self) -> None:
        """Wait until the polling task has exited (tests count tasks)."""
        while self._runner is not None and not self._runner.done():
            await asyncio.sleep(self.interval)


class _Watching:
    __slots__ = ("watcher", "request", "call", "task")

    def __init__(self, watcher: CallWatcher, request: Any, call: Any) -> None:
        self.watcher, self.request, self.call = watcher, request, call
        self.task: asyncio.Task[Any] | None = None

    def __enter__(self) -> None:
        w = self.watcher
        # aiohttp knows the handler's task (asking asyncio costs more)
        task = getattr(self.request, "task", None) or asyncio.current_task()
        if task is None:  # pragma: no cover - always inside a task under aiohttp
            return
        self.task = task
        w._entries[task] = (self.request, self.call)
        if w._runner is None or w._runner.done():
            w._runner = asyncio.get_running_loop().create_task(w._run(), name="cheapproxy-call-watcher")

    def __exit__(self, *_: Any) -> None:
        if self.task is not None:
            self.watcher._entries.pop(self.task, None)


def absorb(call: Any) -> str | None:
    """Inside ``except CancelledError``: if the cancellation is our interrupt,
    take it back (``Task.uncancel``) and return its reason; None means a real
    cancellation that must propagate.  Absorbs at most once per call."""
    reason = call.interrupt
    if reason is None or call.interrupt_absorbed:
        return None
    call.interrupt_absorbed = True
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        task.uncancel()
    return reason
