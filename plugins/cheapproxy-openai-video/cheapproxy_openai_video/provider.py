"""The ``openai-video`` provider type: video tasks through the OpenAI Videos
API (Sora).

API facts relied on (``openai`` 3.54 ``resources/videos.py`` and
``types/video*.py``; the API reference "Create video" and the video
generation guide):

* ``POST {base}/videos`` with ``Authorization: Bearer``; body ``prompt``
  (required), ``model`` (``sora-2``, ``sora-2-pro``, dated versions),
  ``seconds`` (a *string*: "4", "8", "12"; default "4"), ``size``
  (``WIDTHxHEIGHT``: 720x1280, 1280x720, 1024x1792, 1792x1024; default
  720x1280), ``input_reference`` (a file, multipart only) -> a ``video``
  object (``id``, ``object: "video"``, ``status: "queued"``).  The body is
  sent as JSON (the reference lists JSON body parameters; the SDK uses
  multipart only to carry a file).
* ``GET {base}/videos/{id}`` -> ``status`` queued / in_progress / completed /
  failed, ``progress``, ``seconds``, ``size``, ``error {code, message}``.
  There is no usage object: a video is priced by its seconds and size.
* ``GET {base}/videos/{id}/content[?variant=video|thumbnail|spritesheet]``
  -> the MP4 (it needs the API key, so clients fetch it through the gateway).
* The Sora API is deprecated and shuts down on 2026-09-24 (OpenAI notice).
"""

from __future__ import annotations

from typing import Any, ClassVar
from urllib.parse import quote

import aiohttp
import attrs

from cheapproxy.errors import ProxyError, UpstreamError
from cheapproxy.provider import ProviderType
from cheapproxy.tasks import (
    TaskProvider,
    TaskSpec,
    TaskStatus,
    call_json,
    get_task_object,
    resolution_of,
    seconds_value,
    upstream_error,
)

STATES = {"queued": "queued", "in_progress": "running", "completed": "succeeded", "failed": "failed",
          "cancelled": "cancelled"}
VARIANTS = ("video", "thumbnail", "spritesheet")


def size_for(ratio: str | None, resolution: str | None) -> str | None:
    """An aspect ratio plus a resolution as the ``WIDTHxHEIGHT`` the Videos
    API takes (16:9 720p -> 1280x720; 9:16 -> 720x1280); None if impossible."""
    try:
        p = int((resolution or "720p").removesuffix("p"))
    except ValueError:
        return None
    long = round(p * 16 / 9)
    if ratio in (None, "9:16"):
        return f"{p}x{long}"
    if ratio == "16:9":
        return f"{long}x{p}"
    return None


class OpenAIVideoProvider(TaskProvider, ProviderType):
    """``provider = "openai-video"``: Sora through the Videos API; the key goes
    in ``Authorization: Bearer``.  Price with ``per_second_by_resolution``
    (the API reports seconds and size, no tokens)."""

    name: ClassVar[str] = "openai-video"
    protocol: ClassVar[str | None] = None
    default_base_url: ClassVar[str | None] = "https://api.openai.com/v1"
    operations: ClassVar[frozenset[str]] = frozenset({"tasks"})
    task_kinds: ClassVar[frozenset[str]] = frozenset({"video"})
    usage_units: ClassVar[frozenset[str]] = frozenset({"seconds"})
    default_duration_seconds: ClassVar[int | None] = 4
    default_resolution: ClassVar[str | None] = "720p"
    default_size: ClassVar[str | None] = "720x1280"
    content_proxied: ClassVar[bool] = True

    def auth_headers(self) -> dict[str, str]:
        key = self.upstream.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    @property
    def _secrets(self) -> list[str]:
        return [self.upstream.api_key] if self.upstream.api_key else []

    def build_spec(self, body: dict[str, Any], *, kind: str, model: str, upstream_model: str) -> TaskSpec:
        """The contract's fields in the Videos API's terms: ``duration`` ->
        ``seconds``, ``size`` / ``resolution`` -> one ``WIDTHxHEIGHT``."""
        spec = super().build_spec(body, kind=kind, model=model, upstream_model=upstream_model)
        if spec.prompt is None:
            raise ProxyError("invalid_request", "Missing required field 'prompt'.", param="prompt")
        if spec.duration == -1:
            raise ProxyError("invalid_request", "This model needs 'seconds' (or 'duration'), e.g. 4, 8 or 12.",
                             param="seconds")
        size = spec.size
        if size in ("adaptive", "auto", "keep_ratio"):
            size = None
        if size is None and spec.resolution:
            size = size_for(None, spec.resolution)
        elif size is not None and "x" not in size:
            size = size_for(size, spec.resolution)
            if size is None:
                raise ProxyError("invalid_request", "The OpenAI Videos API takes 16:9 or 9:16 videos; send a size such "
                                 "as '1280x720' or '720x1280'.", param="size")
        return attrs.evolve(spec, size=size, resolution=resolution_of(size) if size else spec.resolution)

    def request_body(self, spec: TaskSpec) -> dict[str, Any]:
        body: dict[str, Any] = {**spec.extra, "model": spec.upstream_model, "prompt": spec.prompt}
        if spec.duration is not None:
            body["seconds"] = str(spec.duration)
        if spec.size:
            body["size"] = spec.size
        return body

    async def submit(self, session: aiohttp.ClientSession, spec: TaskSpec) -> str:
        reply = await call_json(session, "POST", self.url("/videos"), upstream=self.upstream.name,
                                headers=self.auth_headers(), json_body=self.request_body(spec), secrets=self._secrets)
        if reply.status >= 400:
            raise upstream_error(reply, self.upstream.name, self._secrets)
        video_id = reply.body.get("id") if isinstance(reply.body, dict) else None
        if not isinstance(video_id, str) or not video_id:
            raise UpstreamError("upstream_failed", f"upstream {self.upstream.name!r} accepted the video but sent no id")
        return video_id

    async def poll(self, session: aiohttp.ClientSession, provider_task_id: str) -> TaskStatus:
        url = self.url("/videos/" + quote(provider_task_id, safe=""))
        return self.map_status(await get_task_object(session, url, upstream=self.upstream.name, headers=self.auth_headers(),
                                                     secrets=self._secrets, task_id=provider_task_id))

    def map_status(self, b: Any) -> TaskStatus:
        """A ``video`` object -> TaskStatus; usage is ``{seconds, size}``."""
        if not isinstance(b, dict):
            raise UpstreamError("upstream_failed", f"upstream {self.upstream.name!r} sent a video that is not a JSON object")
        raw = b.get("status")
        state = STATES.get(raw, "running") if isinstance(raw, str) else "running"
        size = b.get("size") if isinstance(b.get("size"), str) else None
        seconds = seconds_value(b.get("seconds"))
        err = b.get("error") if isinstance(b.get("error"), dict) else {}
        progress = b.get("progress") if isinstance(b.get("progress"), int) else None
        usage = {"seconds": b.get("seconds"), "size": size} if state == "succeeded" else None
        return TaskStatus(
            state=state, usage=usage, seconds=seconds, size=size, resolution=resolution_of(size), progress=progress,
            error_code=err.get("code") if isinstance(err.get("code"), str) else None,
            error_message=err.get("message") if isinstance(err.get("message"), str) else None,
        )

    async def fetch_content(self, session: aiohttp.ClientSession, provider_task_id: str,
                            variant: str | None) -> aiohttp.ClientResponse:
        params = {"variant": variant} if variant in VARIANTS else None
        if variant is not None and params is None:
            raise ProxyError("invalid_request", f"'variant' must be one of {', '.join(VARIANTS)}.", param="variant")
        return await session.get(self.url("/videos/" + quote(provider_task_id, safe="") + "/content"), params=params,
                                 headers=self.auth_headers(), allow_redirects=False)
