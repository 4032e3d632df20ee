"""The task capability of provider types: what a plugin implements so that the
core can run async (video, image, audio) tasks through it.

A provider type becomes task-capable by mixing in ``TaskProvider`` next to
``cheapproxy.provider.ProviderType`` and implementing ``submit`` and ``poll``.
The core owns everything else: request validation (``build_spec``), the hold,
the durable poller, billing and webhooks.  A provider type that answers images
synchronously mixes in ``ImageProvider`` instead (or as well).
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any, ClassVar

import aiohttp
import attrs

from .. import ir
from ..errors import ProxyError

KINDS = ("video", "image", "audio")
PROVIDER_STATES = ("queued", "running", "succeeded", "failed", "cancelled")

# fields the task API reads itself; everything else goes to the provider as it is
RESERVED_FIELDS = frozenset({"model", "prompt", "duration", "seconds", "resolution", "size", "callback_url"})
# credentials and upstream hosts can never come from a client body, at any depth
BANNED_FIELDS = frozenset({"api_key", "api_base", "base_url", "user_config", "extra_body", "extra_headers",
                           "authorization", "x-api-key", "api_version", "organization", "azure_endpoint"})
MAX_DURATION_SECONDS = 600
MAX_PROMPT_CHARS = 100_000
_RESOLUTION = re.compile(r"^(\d{3,4}p|[1-8]k)$")
_RATIO = re.compile(r"^(\d{1,2}):(\d{1,2})$")
_WXH = re.compile(r"^(\d{2,5})x(\d{2,5})$")
_SIZE_WORDS = frozenset({"adaptive", "keep_ratio", "auto"})


@attrs.frozen(kw_only=True)
class TaskSpec:
    """A validated task request, as the provider receives it.

    ``duration`` is in whole seconds (``-1`` where the provider lets the model
    choose), ``resolution`` like ``720p``, ``size`` an aspect ratio (``9:16``)
    or ``WIDTHxHEIGHT``; None means "the provider's default".  ``extra`` holds
    every other body field unchanged.
    """

    kind: str
    model: str
    upstream_model: str
    prompt: str | None = None
    duration: int | None = None
    resolution: str | None = None
    size: str | None = None
    extra: dict[str, Any] = attrs.Factory(dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "upstream_model": self.upstream_model, "prompt": self.prompt,
                "duration": self.duration, "resolution": self.resolution, "size": self.size, "extra": self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskSpec:
        return cls(kind=data["kind"], model=data["model"], upstream_model=data["upstream_model"],
                   prompt=data.get("prompt"), duration=data.get("duration"), resolution=data.get("resolution"),
                   size=data.get("size"), extra=dict(data.get("extra") or {}))


@attrs.frozen(kw_only=True)
class TaskEstimate:
    """What a task is expected to produce, for the hold.  ``tokens`` is the
    provider's usage-token estimate (token-priced models), ``seconds`` the
    output duration; None when unknown (then the configured maximum is held)."""

    tokens: int | None = None
    seconds: int | None = None
    resolution: str | None = None
    size: str | None = None


@attrs.frozen(kw_only=True)
class TaskStatus:
    """A provider's answer to a poll, mapped to the core's vocabulary.

    ``state`` is one of ``queued``, ``running``, ``succeeded``, ``failed``,
    ``cancelled``.  ``usage`` is the provider's usage object as reported (shown
    to the user); ``usage_tokens`` the tokens to bill (None: not reported);
    ``seconds`` / ``resolution`` / ``size`` describe the output actually made
    (per-second pricing).  ``result_urls`` are URLs a client may fetch directly;
    leave them empty when the output needs the upstream credential and
    implement ``fetch_content`` instead.
    """

    state: str
    result_urls: tuple[str, ...] = ()
    usage: dict[str, Any] | None = None
    usage_tokens: int | None = None
    seconds: int | None = None
    resolution: str | None = None
    size: str | None = None
    progress: int | None = None
    error_code: str | None = None
    error_message: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.state not in PROVIDER_STATES:
            raise ValueError(f"unknown task state {self.state!r}")


class TaskNotFound(Exception):
    """The provider does not know the task (any more): it ends ``failed``."""


@attrs.frozen(kw_only=True)
class ImageResult:
    """A synchronous image answer: OpenAI-shaped ``data`` items
    (``{"url": ...}`` or ``{"b64_json": ...}``) and the usage to bill."""

    data: list[dict[str, Any]]
    usage: ir.Usage | None = None
    extra: dict[str, Any] = attrs.Factory(dict)  # other top-level fields to return (size, quality, ...)


class TaskProvider:
    """Mixin for provider types that run async tasks.

    Class attributes:

    * ``task_kinds``: the kinds served (``video``, ``image``, ``audio``).
    * ``usage_units``: what the provider reports on success, ``tokens`` and/or
      ``seconds``; a model priced ``per_token`` needs ``tokens``, one priced
      ``per_second_by_resolution`` needs ``seconds`` (checked at startup).
    * ``default_duration_seconds``, ``default_resolution``, ``default_size``:
      what the provider does when the client leaves them out (used for holds).
    * ``prompt_alternatives``: body fields that can stand in for ``prompt``
      (e.g. Ark's ``content`` array).
    * ``content_proxied``: results need the upstream credential, so clients
      fetch them through ``GET /v1/tasks/{id}/content`` (``fetch_content``).
    """

    task_kinds: ClassVar[frozenset[str]] = frozenset({"video"})
    usage_units: ClassVar[frozenset[str]] = frozenset({"tokens"})
    default_duration_seconds: ClassVar[int | None] = None
    default_resolution: ClassVar[str | None] = None
    default_size: ClassVar[str | None] = None
    prompt_alternatives: ClassVar[tuple[str, ...]] = ()
    content_proxied: ClassVar[bool] = False

    def build_spec(self, body: dict[str, Any], *, kind: str, model: str, upstream_model: str) -> TaskSpec:
        """Validate a client body into a ``TaskSpec`` (ProxyError 400 on bad input)."""
        return parse_task_body(body, kind=kind, model=model, upstream_model=upstream_model,
                               prompt_alternatives=self.prompt_alternatives)

    def estimate(self, spec: TaskSpec) -> TaskEstimate:
        """The expected output, for the hold; override to estimate usage tokens."""
        seconds = spec.duration if spec.duration is not None else self.default_duration_seconds
        return TaskEstimate(seconds=seconds if seconds is not None and seconds > 0 else None,
                            resolution=spec.resolution or self.default_resolution, size=spec.size or self.default_size)

    async def submit(self, session: aiohttp.ClientSession, spec: TaskSpec) -> str:
        """Create the task upstream; return the provider's task id.  Raise
        ``cheapproxy.errors.UpstreamError`` when the provider refuses it."""
        raise NotImplementedError  # pragma: no cover - interface

    async def poll(self, session: aiohttp.ClientSession, provider_task_id: str) -> TaskStatus:
        """The task's current state.  Raise ``TaskNotFound`` when the provider
        forgot it; any other exception is retried with back-off until the
        task's deadline."""
        raise NotImplementedError  # pragma: no cover - interface

    async def fetch_content(self, session: aiohttp.ClientSession, provider_task_id: str,
                            variant: str | None) -> aiohttp.ClientResponse:
        """Open the output of a finished task (only when ``content_proxied``)."""
        raise NotImplementedError  # pragma: no cover - interface


class ImageProvider:
    """Mixin for provider types that answer ``/v1/images/generations`` at once."""

    def answers_at_once(self, upstream_model: str) -> bool:
        """False for image models this provider runs as tasks instead."""
        return True

    async def generate_images(self, session: aiohttp.ClientSession | None, spec: TaskSpec) -> ImageResult:
        raise NotImplementedError  # pragma: no cover - interface


# ---------------------------------------------------------------- body parsing


def _bad(message: str, param: str | None = None) -> ProxyError:
    return ProxyError("invalid_request", message, param=param)


def find_banned(value: Any, depth: int = 0) -> str | None:
    """The first banned field name anywhere in ``value`` (credentials, hosts)."""
    if depth > 64:
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and k.lower() in BANNED_FIELDS:
                return k
            found = find_banned(v, depth + 1)
            if found:
                return found
    elif isinstance(value, list):
        for v in value:
            found = find_banned(v, depth + 1)
            if found:
                return found
    return None


def parse_duration(body: dict[str, Any]) -> int | None:
    """``duration`` (or ``seconds``, as the OpenAI Videos API calls it) in
    whole seconds: an int, an integral float or a digit string; -1 = auto."""
    values = [(n, body[n]) for n in ("duration", "seconds") if body.get(n) is not None]
    if not values:
        return None
    parsed = []
    for name, v in values:
        if isinstance(v, str) and re.fullmatch(r"-?\d{1,6}", v.strip()):
            v = int(v.strip())
        elif isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or not (v == -1 or 1 <= v <= MAX_DURATION_SECONDS):
            raise _bad(f"'{name}' must be a whole number of seconds from 1 to {MAX_DURATION_SECONDS} "
                       "(or -1 to let the model choose).", name)
        parsed.append(v)
    if len(set(parsed)) > 1:
        raise _bad("'duration' and 'seconds' disagree; send one of them.", "duration")
    return parsed[0]


def parse_task_body(body: dict[str, Any], *, kind: str, model: str, upstream_model: str,
                    prompt_alternatives: tuple[str, ...] = ()) -> TaskSpec:
    """The contract's task body: ``model``, ``prompt``, ``duration``/``seconds``,
    ``resolution``, ``size``; other fields pass through unchanged."""
    banned = find_banned(body)
    if banned:
        raise _bad(f"The field '{banned}' is not accepted: upstream hosts and credentials are set by the operator.", banned)
    prompt = body.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise _bad("'prompt' must be a non-empty string.", "prompt")
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise _bad(f"'prompt' is longer than {MAX_PROMPT_CHARS} characters.", "prompt")
    if prompt is None and not any(body.get(f) for f in prompt_alternatives):
        alt = "".join(f" (or '{f}')" for f in prompt_alternatives)
        raise _bad(f"Missing required field 'prompt'{alt}.", "prompt")
    resolution = body.get("resolution")
    if resolution is not None:
        if not isinstance(resolution, str) or not _RESOLUTION.match(resolution.strip().lower()):
            raise _bad("'resolution' must be like '480p', '720p' or '1080p'.", "resolution")
        resolution = resolution.strip().lower()
    size = body.get("size")
    if size is not None:
        s = size.strip().lower() if isinstance(size, str) else None
        if s is None or not (_RATIO.match(s) or _WXH.match(s) or s in _SIZE_WORDS):
            raise _bad("'size' must be an aspect ratio such as '9:16' or a size such as '1280x720'.", "size")
        size = s
    extra = {k: v for k, v in body.items() if k not in RESERVED_FIELDS}
    return TaskSpec(kind=kind, model=model, upstream_model=upstream_model, prompt=prompt,
                    duration=parse_duration(body), resolution=resolution, size=size, extra=extra)


# ---------------------------------------------------------------- size helpers


def short_side(size: str | None) -> int | None:
    """The shorter side of ``WIDTHxHEIGHT`` (None for anything else)."""
    m = _WXH.match(size or "")
    return min(int(m.group(1)), int(m.group(2))) if m else None


def resolution_of(size: str | None) -> str | None:
    """The resolution class of ``WIDTHxHEIGHT``: the smallest standard ``Np``
    whose N is at least the shorter side (``1280x720`` -> ``720p``,
    ``1024x1792`` -> ``1080p``)."""
    short = short_side(size)
    if short is None:
        return None
    for std in (360, 480, 540, 720, 1080, 1440, 2160):
        if short <= std:
            return f"{std}p"
    return f"{short}p"


def ratio_of(size: str | None) -> str | None:
    """``1280x720`` -> ``16:9`` (reduced); an aspect ratio is returned as is."""
    if size and _RATIO.match(size):
        return size
    m = _WXH.match(size or "")
    if not m:
        return None
    w, h = int(m.group(1)), int(m.group(2))
    from math import gcd

    g = gcd(w, h) or 1
    return f"{w // g}:{h // g}"


def seconds_value(value: Any) -> int | None:
    """A provider's duration (int, float or digit string) as whole seconds,
    rounded up (a 4.2 s clip is billed as 5 s); None when absent or invalid."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        d = Decimal(str(value).strip())
    except ArithmeticError:
        return None
    if not d.is_finite() or d <= 0 or d > 10**6:
        return None
    return int(d.to_integral_value(rounding="ROUND_CEILING"))
