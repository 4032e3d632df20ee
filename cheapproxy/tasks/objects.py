"""The public shapes of a task: the task object (``GET /v1/tasks/{id}``,
webhooks, ``cheapproxy tasks show``) and the OpenAI Videos ``video`` object."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from ..storage.records import TaskRecord

FINALIZING = "finalizing"  # internal: the outcome is claimed, billing under way
PUBLIC_STATES = ("queued", "running", "succeeded", "failed")


def public_state(state: str) -> str:
    """The four states of the API: ``finalizing`` still reads ``running``
    (its cost is not recorded yet), ``cancelled`` reads ``failed``."""
    if state == FINALIZING:
        return "running"
    if state == "cancelled":
        return "failed"
    return state if state in PUBLIC_STATES else "running"


def money(value: Decimal) -> str:
    """A task charge as a decimal string with two decimals (they are whole cents)."""
    cents = value.quantize(Decimal("0.01"))
    return str(cents) if cents == value else str(value.normalize())


def unix(value: dt.datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def content_url(task: TaskRecord, base_url: str | None, index: int = 0) -> str:
    path = f"/v1/tasks/{task.id}/content" + (f"?index={index}" if index else "")
    return (base_url or "").rstrip("/") + path


def result_urls(task: TaskRecord, base_url: str | None) -> list[str]:
    """Direct result URLs, or the gateway's content URL when the output needs
    the upstream credential (never handed to clients)."""
    if public_state(task.state) != "succeeded":
        return []
    result = task.result or {}
    if result.get("proxied"):
        return [content_url(task, base_url)]
    return [u for u in result.get("urls") or [] if isinstance(u, str)]


def task_error(task: TaskRecord) -> dict[str, str] | None:
    if public_state(task.state) != "failed":
        return None
    result = task.result or {}
    return {"code": str(result.get("error_code") or "task_failed"), "message": task.error or "The task failed."}


def task_json(task: TaskRecord, *, base_url: str | None = None) -> dict[str, Any]:
    """The task object.  Money is a decimal string; a failed task costs "0.00"."""
    state = public_state(task.state)
    spec = (task.request or {}).get("spec") or {}
    result = task.result or {}
    if state == "succeeded":
        cost = money(task.cost) if task.cost is not None else None
    elif state == "failed":
        cost = "0.00"
    else:
        cost = None
    out: dict[str, Any] = {
        "task_id": task.id,
        "id": task.id,
        "object": "task",
        "kind": task.kind,
        "model": task.model,
        "status": state,
        "progress": 100 if state == "succeeded" else result.get("progress"),
        "created_at": unix(task.created_at),
        "updated_at": unix(task.updated_at),
        "finished_at": unix(task.updated_at) if state in ("succeeded", "failed") else None,
        "request": {"prompt": spec.get("prompt"), "duration": spec.get("duration"),
                    "resolution": spec.get("resolution"), "size": spec.get("size")},
        "result_urls": result_urls(task, base_url),
        "usage": task.usage if state == "succeeded" else None,
        "cost": cost,
        "held": (task.request or {}).get("hold_usd") if state in ("queued", "running") else None,
        "error": task_error(task),
    }
    billed = result.get("billed")
    if state == "succeeded" and isinstance(billed, dict):
        out["billed"] = {k: billed.get(k) for k in ("tokens", "seconds", "resolution", "size", "source")}
    return out


_VIDEO_STATUS = {"queued": "queued", "running": "in_progress", "succeeded": "completed", "failed": "failed"}


def video_json(task: TaskRecord) -> dict[str, Any]:
    """The OpenAI Videos API ``video`` object for a task (``/v1/videos``)."""
    state = public_state(task.state)
    spec = (task.request or {}).get("spec") or {}
    result = task.result or {}
    billed = result.get("billed") if isinstance(result.get("billed"), dict) else {}
    est = (task.request or {}).get("estimate") or {}
    seconds = billed.get("seconds") or spec.get("duration") or est.get("seconds")
    size = billed.get("size") or spec.get("size") or est.get("size") or ""
    progress = 100 if state == "succeeded" else int(result.get("progress") or 0)
    err = task_error(task)
    return {
        "id": task.id,
        "object": "video",
        "model": task.model,
        "status": _VIDEO_STATUS[state],
        "progress": progress,
        "created_at": unix(task.created_at),
        "completed_at": unix(task.updated_at) if state in ("succeeded", "failed") else None,
        "expires_at": None,
        "prompt": spec.get("prompt"),
        "seconds": str(seconds) if seconds else "",
        "size": size,
        "remixed_from_video_id": None,
        "error": err,
    }
