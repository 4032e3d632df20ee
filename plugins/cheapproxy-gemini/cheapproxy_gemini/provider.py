"""The ``gemini`` provider type: Google's Gemini Developer API."""

from __future__ import annotations

from decimal import Decimal
from typing import ClassVar

from cheapproxy.config import ModelConfig, PriceConfig
from cheapproxy.provider import ProviderType

from .wire import PROTOCOL

# (model, USD per 1M tokens: input, output, cache read; max output tokens).
# List prices of the paid tier for prompts up to 200k tokens.  Gemini bills
# context caching as storage time, not as written tokens, so cache_write is
# priced like input (a Gemini upstream never reports written tokens anyway).
_MODELS: tuple[tuple[str, str, str, str, int, str], ...] = (
    ("gemini-2.5-pro", "1.25", "10.00", "0.125", 65536, "Gemini 2.5 Pro"),
    ("gemini-2.5-flash", "0.30", "2.50", "0.03", 65536, "Gemini 2.5 Flash"),
    ("gemini-2.5-flash-lite", "0.10", "0.40", "0.01", 65536, "Gemini 2.5 Flash-Lite"),
    ("gemini-3-flash-preview", "0.50", "3.00", "0.05", 65536, "Gemini 3 Flash (preview)"),
)


class GeminiProvider(ProviderType):
    """Upstream ``provider = "gemini"``: ``x-goog-api-key`` auth, root base URL."""

    name: ClassVar[str] = "gemini"
    protocol: ClassVar[str | None] = PROTOCOL
    default_base_url: ClassVar[str | None] = "https://generativelanguage.googleapis.com"
    env_key: ClassVar[str | None] = "GEMINI_API_KEY"
    operations: ClassVar[frozenset[str]] = frozenset({"chat", "count_tokens"})

    def auth_headers(self) -> dict[str, str]:
        # only the configured upstream key; nothing from the client is forwarded
        key = self.upstream.api_key
        return {"x-goog-api-key": key} if key else {}

    @classmethod
    def default_models(cls, upstream_name: str) -> list[ModelConfig]:
        return [
            ModelConfig(
                name=name,
                upstream=upstream_name,
                max_output_tokens=max_out,
                context_window=1_048_576,
                description=desc,
                price=PriceConfig(
                    scheme="per_token",
                    options={
                        "input": Decimal(inp),
                        "output": Decimal(out),
                        "cache_write": Decimal(inp),
                        "cache_read": Decimal(cached),
                    },
                ),
            )
            for name, inp, out, cached, max_out, desc in _MODELS
        ]
