"""The demo provider's task and image side (no network at all).

* ``demo-image`` answers ``/v1/images/generations`` at once with a 1x1 PNG
  per image; usage: the prompt's tokens in, 100 tokens out per image.
* ``demo-video`` / ``demo-audio`` / ``demo-image-task`` are tasks that
  succeed on the first poll, or fail when the prompt contains ``[fail]``.
  The outcome, duration (or image count) and resolution are encoded in the
  provider task id, so polling needs no state and a restarted gateway resumes
  demo tasks like real ones.
"""

from __future__ import annotations

import secrets
from typing import Any, ClassVar

import aiohttp

from .. import ir
from ..config import ModelConfig, PriceConfig
from .base import ImageResult, TaskEstimate, TaskNotFound, TaskProvider, TaskSpec, TaskStatus

PNG_1X1 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
IMAGE_OUTPUT_TOKENS = 100
RESULT_HOST = "https://demo.cheapproxy.invalid"  # .invalid: reserved, never resolves (RFC 2606)


def _tokens(text: str) -> int:
    n = len(text.encode())
    return max(1, (n + 3) // 4) if n else 0


def _count(spec: TaskSpec) -> int:
    n = spec.extra.get("n", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 10 else 1


class DemoTasks:
    """Mixed into the demo provider type."""

    task_kinds: ClassVar[frozenset[str]] = frozenset({"video", "audio", "image"})
    usage_units: ClassVar[frozenset[str]] = frozenset({"seconds", "tokens"})  # seconds (video, audio), tokens (images)
    default_duration_seconds: ClassVar[int | None] = 5
    default_resolution: ClassVar[str | None] = "720p"

    @staticmethod
    def demo_models(upstream_name: str) -> list[ModelConfig]:
        return [
            ModelConfig(name="demo-image", upstream=upstream_name, kind="image", max_output_tokens=IMAGE_OUTPUT_TOKENS,
                        description="Built-in demo image model: answers at once with a 1x1 PNG (no upstream).",
                        price=PriceConfig(scheme="per_token", options={"input": "1.00", "output": "40.00"})),
            ModelConfig(name="demo-video", upstream=upstream_name, kind="video", max_output_tokens=1,
                        description="Built-in demo video task model: succeeds on the first poll, fails on '[fail]'.",
                        price=PriceConfig(scheme="per_second_by_resolution",
                                          options={"per_second": {"480p": "0.02", "720p": "0.05", "1080p": "0.10"}})),
            ModelConfig(name="demo-image-task", upstream=upstream_name, kind="image", max_output_tokens=IMAGE_OUTPUT_TOKENS,
                        description="Built-in demo image task model: returns a task that succeeds on the first poll.",
                        price=PriceConfig(scheme="per_token", options={"output": "40.00"})),
            ModelConfig(name="demo-audio", upstream=upstream_name, kind="audio", max_output_tokens=1,
                        description="Built-in demo audio task model: succeeds on the first poll, fails on '[fail]'.",
                        price=PriceConfig(scheme="per_second_by_resolution", options={"per_second": {"default": "0.01"}})),
        ]

    def answers_at_once(self, upstream_model: str) -> bool:
        return upstream_model != "demo-image-task"

    def estimate(self, spec: TaskSpec) -> TaskEstimate:
        if spec.kind == "image":
            return TaskEstimate(tokens=IMAGE_OUTPUT_TOKENS * _count(spec))
        return TaskProvider.estimate(self, spec)  # type: ignore[arg-type]

    def build_spec(self, body: dict[str, Any], *, kind: str, model: str, upstream_model: str) -> TaskSpec:
        from .base import parse_task_body

        spec = parse_task_body(body, kind=kind, model=model, upstream_model=upstream_model)
        if kind == "audio":
            # audio has no resolution; 10 s unless asked
            return TaskSpec(kind=kind, model=model, upstream_model=upstream_model, prompt=spec.prompt,
                            duration=spec.duration if spec.duration and spec.duration > 0 else 10, extra=spec.extra)
        return spec

    async def submit(self, session: aiohttp.ClientSession | None, spec: TaskSpec) -> str:
        outcome = "fail" if spec.prompt and "[fail]" in spec.prompt else "ok"
        seconds = spec.duration if spec.duration and spec.duration > 0 else (10 if spec.kind == "audio" else 5)
        if spec.kind == "image":
            seconds = _count(spec)  # the image count rides in the same slot
        res = "-" if spec.kind in ("audio", "image") else (spec.resolution or "720p")
        return f"demo.{spec.kind}.{outcome}.{seconds}.{res}.{secrets.token_hex(6)}"

    async def poll(self, session: aiohttp.ClientSession | None, provider_task_id: str) -> TaskStatus:
        try:
            _, kind, outcome, seconds, res, tag = provider_task_id.split(".")
            secs = int(seconds)
        except ValueError:
            raise TaskNotFound(provider_task_id) from None
        if outcome == "fail":
            return TaskStatus(state="failed", error_code="demo_failure",
                              error_message="The demo task failed on cue ('[fail]' in the prompt).")
        if kind == "image":
            urls = tuple(f"{RESULT_HOST}/image/{tag}-{i}.png" for i in range(secs))
            tokens = IMAGE_OUTPUT_TOKENS * secs
            return TaskStatus(state="succeeded", result_urls=urls, usage={"images": secs, "output_tokens": tokens},
                              usage_tokens=tokens, progress=100)
        ext = "mp4" if kind == "video" else "wav"
        resolution = None if res == "-" else res
        usage: dict[str, Any] = {"seconds": secs}
        if resolution:
            usage["resolution"] = resolution
        return TaskStatus(state="succeeded", result_urls=(f"{RESULT_HOST}/{kind}/{tag}.{ext}",), usage=usage,
                          seconds=secs, resolution=resolution, progress=100)

    async def generate_images(self, session: aiohttp.ClientSession | None, spec: TaskSpec) -> ImageResult:
        n = _count(spec)
        if spec.prompt and "[fail]" in spec.prompt:
            from ..errors import UpstreamError

            raise UpstreamError("upstream_rejected", "The demo image model refused on cue ('[fail]' in the prompt).",
                                status=400, upstream_status=400)
        data = [{"b64_json": PNG_1X1, "revised_prompt": spec.prompt} for _ in range(n)]
        usage = ir.Usage(input_tokens=max(1, _tokens(spec.prompt or "")), output_tokens=IMAGE_OUTPUT_TOKENS * n)
        return ImageResult(data=data, usage=usage, extra={"size": "1x1", "output_format": "png"})
