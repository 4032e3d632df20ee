"""Base class for provider types registered through ``register_provider_types``.

A provider type is a thin transport: which protocol its upstream speaks, where
the upstream lives, and how it authenticates.  One instance is made per
``[[upstreams]]`` table.  Translation lives in protocols, not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncIterator, ClassVar

import attrs

from . import ir

if TYPE_CHECKING:
    from .config import ModelConfig, UpstreamConfig


@attrs.frozen(kw_only=True)
class NoOptions:
    """Provider types without extra TOML keys use this: any extra key is refused."""


class ProviderType:
    """Subclass and register.  Class attributes:

    * ``name``: the ``provider = "..."`` value in TOML.
    * ``protocol``: the registered protocol name the upstream speaks for chat
      (``openai-chat``, ``openai-responses``, ``anthropic-messages``, ``gemini``),
      or None for an in-process provider (then implement ``generate``).
    * ``options_class``: an attrs class for the provider's extra TOML keys.
    * ``default_base_url``, ``env_key``: used when the upstream table omits
      ``base_url`` and for config-less ``serve`` (an upstream is registered when
      the environment variable ``env_key`` is set).
    * ``operations``: what it serves: ``chat``, ``embeddings``, ``count_tokens``,
      ``tasks``.
    """

    name: ClassVar[str]
    protocol: ClassVar[str | None] = None
    options_class: ClassVar[type] = NoOptions
    default_base_url: ClassVar[str | None] = None
    env_key: ClassVar[str | None] = None
    operations: ClassVar[frozenset[str]] = frozenset({"chat"})

    def __init__(self, upstream: UpstreamConfig, options: Any) -> None:
        self.upstream = upstream
        self.options = options
        self.base_url = (upstream.base_url or self.default_base_url or "").rstrip("/")

    # -- transport

    def auth_headers(self) -> dict[str, str]:
        """Headers carrying the upstream credential (e.g. ``Authorization: Bearer``)."""
        return {}

    def auth_query(self) -> dict[str, str]:
        """Query parameters carrying the credential, for upstreams that want it there."""
        return {}

    def url(self, path: str) -> str:
        return self.base_url + path

    # -- zero-config

    @classmethod
    def default_models(cls, upstream_name: str) -> list[ModelConfig]:
        """Models to register when this upstream is created from the environment."""
        return []

    # -- in-process providers (demo): no HTTP upstream

    async def generate(self, request: ir.Request, upstream_model: str) -> AsyncIterator[ir.StreamEvent]:
        """Yield IR stream events for ``request`` (only when ``protocol`` is None)."""
        raise NotImplementedError  # pragma: no cover - interface
        yield  # noqa

    async def embed(self, request: ir.EmbeddingRequest, upstream_model: str) -> ir.EmbeddingResponse:
        raise NotImplementedError  # pragma: no cover - interface
