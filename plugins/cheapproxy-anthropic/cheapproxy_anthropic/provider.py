"""The ``anthropic`` provider type: api.anthropic.com through anthropic-messages."""

from __future__ import annotations

from decimal import Decimal
from typing import ClassVar

from cheapproxy.config import ModelConfig, PriceConfig
from cheapproxy.provider import ProviderType

from .common import NAME

# (name, aliases, input, output, cache write 5m, cache read) USD per 1M tokens,
# list prices from platform.claude.com/docs/en/about-claude/pricing
_DEFAULT_MODELS: tuple[tuple[str, tuple[str, ...], str, str, str, str], ...] = (
    ("claude-opus-4-8", (), "5", "25", "6.25", "0.50"),
    ("claude-sonnet-4-6", (), "3", "15", "3.75", "0.30"),
    ("claude-sonnet-4-5", ("claude-sonnet-4-5-20250929",), "3", "15", "3.75", "0.30"),
    ("claude-haiku-4-5", ("claude-haiku-4-5-20251001",), "1", "5", "1.25", "0.10"),
)


class AnthropicProvider(ProviderType):
    """Anthropic's API: ``x-api-key`` with the upstream's own key."""

    name: ClassVar[str] = "anthropic"
    protocol: ClassVar[str | None] = NAME
    default_base_url: ClassVar[str | None] = "https://api.anthropic.com"
    env_key: ClassVar[str | None] = "ANTHROPIC_API_KEY"
    operations: ClassVar[frozenset[str]] = frozenset({"chat", "count_tokens"})

    def auth_headers(self) -> dict[str, str]:
        key = self.upstream.api_key
        return {"x-api-key": key} if key else {}

    @classmethod
    def default_models(cls, upstream_name: str) -> list[ModelConfig]:
        return [
            ModelConfig(
                name=name,
                aliases=list(aliases),
                upstream=upstream_name,
                upstream_model=name,
                max_output_tokens=64000,
                context_window=200_000,
                price=PriceConfig(scheme="per_token", options={
                    "input": Decimal(inp), "output": Decimal(out),
                    "cache_write": Decimal(cw), "cache_read": Decimal(cr),
                }),
            )
            for name, aliases, inp, out, cw, cr in _DEFAULT_MODELS
        ]
