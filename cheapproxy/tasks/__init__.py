"""Async image, video and audio tasks: one task API, durable, billed only on
success.

Plugin authors implement ``TaskProvider`` (``submit`` / ``poll``) or
``ImageProvider`` on their provider type; everything else -- validation, the
hold, the durable poller, compare-and-set finalisation, billing and webhooks
-- is ``TaskService``.  See docs/tasks.md.
"""

from __future__ import annotations

from .base import (
    ImageProvider,
    ImageResult,
    TaskEstimate,
    TaskNotFound,
    TaskProvider,
    TaskSpec,
    TaskStatus,
    parse_task_body,
    ratio_of,
    resolution_of,
    seconds_value,
)
from .http import call_json, get_task_object, upstream_error
from .objects import task_json, video_json
from .service import TaskService, validate_task_models

__all__ = [
    "ImageProvider", "ImageResult", "TaskEstimate", "TaskNotFound", "TaskProvider", "TaskService", "TaskSpec",
    "TaskStatus", "call_json", "get_task_object", "parse_task_body", "ratio_of", "resolution_of", "seconds_value", "task_json",
    "upstream_error", "validate_task_models", "video_json",
]
