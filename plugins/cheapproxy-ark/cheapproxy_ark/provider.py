"""The ``ark`` provider type: ByteDance Seedance video generation through the
Volcengine Ark (or BytePlus ModelArk) content-generation task API.

API facts relied on (Ark docs "创建视频生成任务 API" and "查询视频生成任务 API",
docs 82379/1520757 and 82379/1521309; volcengine-python-sdk[ark] 5.0
``content_generation.tasks``):

* ``POST {base}/contents/generations/tasks`` with ``Authorization: Bearer``;
  body ``model``, ``content`` (``[{"type": "text", "text": ...},
  {"type": "image_url", "image_url": {"url": ...}, "role": ...}, ...]``) and
  top-level ``resolution`` (480p/720p/1080p), ``ratio`` (16:9, 9:16, 1:1,
  4:3, 3:4, 21:9, adaptive), ``duration`` (seconds; -1 lets Seedance 2.0
  choose), ``frames``, ``framespersecond``, ``seed``, ``watermark``,
  ``generate_audio``, ``return_last_frame`` ... -> ``{"id": "cgt-..."}``.
* ``GET {base}/contents/generations/tasks/{id}`` -> ``status`` queued /
  running / cancelled / succeeded / failed; on success ``content.video_url``
  (and ``content.last_frame_url``) and ``usage.completion_tokens`` (=
  ``total_tokens``: video models count no input tokens); ``resolution``,
  ``ratio``, ``duration`` (or ``frames``), ``framespersecond``; ``error``
  ``{code, message}`` on failure.  Tasks are queryable for 7 days.
* Usage tokens = width x height x frames / 1024, frames = duration x fps + 1
  (fps 24): 1280x720, 5 s -> 108,900 tokens, the docs' own example.
* Base URLs: ``https://ark.cn-beijing.volces.com/api/v3`` (Volcengine),
  ``https://ark.ap-southeast.bytepluses.com/api/v3`` (BytePlus).
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any, ClassVar
from urllib.parse import quote

import aiohttp

from cheapproxy.errors import ProxyError, UpstreamError
from cheapproxy.provider import ProviderType
from cheapproxy.tasks import (
    TaskEstimate,
    TaskProvider,
    TaskSpec,
    TaskStatus,
    call_json,
    get_task_object,
    ratio_of,
    resolution_of,
    seconds_value,
    upstream_error,
)

STATES = {"queued": "queued", "running": "running", "succeeded": "succeeded", "failed": "failed",
          "cancelled": "cancelled", "expired": "failed"}
FPS = 24
# holds assume the largest frame of a resolution class (p x p x 16/9 pixels)
# and 5% on top: Seedance frame sizes differ a little between ratios
HOLD_MARGIN = Decimal("1.05")


class ArkProvider(TaskProvider, ProviderType):
    """``provider = "ark"``: Seedance video tasks; the key goes in
    ``Authorization: Bearer``.  Prices: ``per_token`` (USD per 1M usage
    tokens, billed as output) or ``per_second_by_resolution``."""

    name: ClassVar[str] = "ark"
    protocol: ClassVar[str | None] = None
    default_base_url: ClassVar[str | None] = "https://ark.cn-beijing.volces.com/api/v3"
    operations: ClassVar[frozenset[str]] = frozenset({"tasks"})
    task_kinds: ClassVar[frozenset[str]] = frozenset({"video"})
    usage_units: ClassVar[frozenset[str]] = frozenset({"tokens", "seconds"})
    default_duration_seconds: ClassVar[int | None] = 5
    default_resolution: ClassVar[str | None] = "720p"
    default_size: ClassVar[str | None] = "16:9"
    prompt_alternatives: ClassVar[tuple[str, ...]] = ("content",)

    def auth_headers(self) -> dict[str, str]:
        key = self.upstream.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    @property
    def _secrets(self) -> list[str]:
        return [self.upstream.api_key] if self.upstream.api_key else []

    # ------------------------------------------------------------ request

    def build_spec(self, body: dict[str, Any], *, kind: str, model: str, upstream_model: str) -> TaskSpec:
        spec = super().build_spec(body, kind=kind, model=model, upstream_model=upstream_model)
        content = spec.extra.get("content")
        if content is not None and (not isinstance(content, list) or not all(isinstance(c, dict) for c in content)):
            raise ProxyError("invalid_request", "'content' must be an array of Ark content objects.", param="content")
        return spec

    def request_body(self, spec: TaskSpec) -> dict[str, Any]:
        """The Ark create body: the prompt becomes the first ``text`` content
        item; ``size`` becomes ``ratio`` (and ``resolution`` for WxH); other
        fields pass through unchanged."""
        extra = dict(spec.extra)
        content: list[Any] = [{"type": "text", "text": spec.prompt}] if spec.prompt else []
        more = extra.pop("content", None)
        if isinstance(more, list):
            content.extend(more)
        body: dict[str, Any] = {**extra, "model": spec.upstream_model, "content": content}
        if spec.duration is not None:
            body["duration"] = spec.duration
        if spec.resolution:
            body["resolution"] = spec.resolution
        if spec.size:
            if spec.size in ("adaptive", "keep_ratio", "auto"):
                body["ratio"] = "adaptive" if spec.size == "auto" else spec.size
            else:
                body["ratio"] = ratio_of(spec.size)
                body.setdefault("resolution", resolution_of(spec.size))
        return {k: v for k, v in body.items() if v is not None}

    def estimate(self, spec: TaskSpec) -> TaskEstimate:
        """Usage tokens of the largest frame at the resolution, x 1.05; no
        estimate for ``duration: -1`` (the configured maximum is held)."""
        fps = spec.extra.get("framespersecond")
        fps = fps if isinstance(fps, int) and not isinstance(fps, bool) and 1 <= fps <= 120 else FPS
        frames = spec.extra.get("frames")
        resolution = spec.resolution or resolution_of(spec.size) or self.default_resolution or "720p"
        if isinstance(frames, int) and not isinstance(frames, bool) and 1 <= frames <= 100_000:
            seconds = math.ceil(frames / fps)
        else:
            seconds = spec.duration if spec.duration is not None else self.default_duration_seconds
            if seconds is None or seconds <= 0:
                return TaskEstimate(resolution=resolution, size=spec.size)
            frames = seconds * fps + 1
        try:
            p = int(resolution[:-1]) if resolution.endswith("p") else {"1k": 1080, "2k": 1440, "4k": 2160}.get(resolution, 2160)
        except ValueError:
            p = 1080
        area = Decimal(p * p * 16) / 9
        tokens = int((area * HOLD_MARGIN * frames / 1024).to_integral_value(rounding="ROUND_CEILING"))
        return TaskEstimate(tokens=tokens, seconds=seconds, resolution=resolution, size=spec.size)

    # ------------------------------------------------------------ HTTP

    async def submit(self, session: aiohttp.ClientSession, spec: TaskSpec) -> str:
        reply = await call_json(session, "POST", self.url("/contents/generations/tasks"), upstream=self.upstream.name,
                                headers=self.auth_headers(), json_body=self.request_body(spec), secrets=self._secrets)
        if reply.status >= 400:
            raise upstream_error(reply, self.upstream.name, self._secrets)
        task_id = reply.body.get("id") if isinstance(reply.body, dict) else None
        if not isinstance(task_id, str) or not task_id:
            raise UpstreamError("upstream_failed", f"upstream {self.upstream.name!r} accepted the task but sent no id")
        return task_id

    async def poll(self, session: aiohttp.ClientSession, provider_task_id: str) -> TaskStatus:
        url = self.url("/contents/generations/tasks/" + quote(provider_task_id, safe=""))
        return self.map_status(await get_task_object(session, url, upstream=self.upstream.name, headers=self.auth_headers(),
                                                     secrets=self._secrets, task_id=provider_task_id))

    def map_status(self, b: Any) -> TaskStatus:
        """An Ark task object -> TaskStatus (state, URLs, usage tokens, output)."""
        if not isinstance(b, dict):
            raise UpstreamError("upstream_failed", f"upstream {self.upstream.name!r} sent a task that is not a JSON object")
        raw = b.get("status")
        state = STATES.get(raw, "running") if isinstance(raw, str) else "running"
        content = b.get("content") if isinstance(b.get("content"), dict) else {}
        urls = tuple(u for u in (content.get("video_url"), content.get("last_frame_url")) if isinstance(u, str) and u)
        usage = b.get("usage") if isinstance(b.get("usage"), dict) else None
        tokens = None
        if usage is not None:
            for name in ("completion_tokens", "total_tokens"):
                v = usage.get(name)
                if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                    tokens = v
                    break
        seconds = seconds_value(b.get("duration"))
        fps = b.get("framespersecond") if isinstance(b.get("framespersecond"), int) else FPS
        if seconds is None and isinstance(b.get("frames"), int) and fps:
            seconds = math.ceil(b["frames"] / fps)
        err = b.get("error") if isinstance(b.get("error"), dict) else {}
        code = err.get("code") if isinstance(err.get("code"), str) else ("expired" if raw == "expired" else None)
        return TaskStatus(
            state=state, result_urls=urls if state == "succeeded" else (), usage=usage, usage_tokens=tokens,
            seconds=seconds, resolution=b.get("resolution") if isinstance(b.get("resolution"), str) else None,
            size=b.get("ratio") if isinstance(b.get("ratio"), str) else None,
            error_code=code, error_message=err.get("message") if isinstance(err.get("message"), str) else None,
        )
