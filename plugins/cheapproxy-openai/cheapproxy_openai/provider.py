"""The ``openai`` provider type: OpenAI's API (or any server speaking Chat
Completions) with a Bearer key."""

from __future__ import annotations

from decimal import Decimal
from typing import ClassVar

from cheapproxy.config import ModelConfig, PriceConfig
from cheapproxy.provider import ProviderType

# (name, input, output, cache_read, max_output_tokens, context_window); USD per
# 1M tokens, OpenAI list prices (standard tier).  OpenAI does not bill cache
# writes separately, so a reported write is priced as ordinary input.
_CHAT_MODELS = (
    ("gpt-5", "1.25", "10.00", "0.125", 128_000, 400_000),
    ("gpt-5-mini", "0.25", "2.00", "0.025", 128_000, 400_000),
    ("gpt-5-nano", "0.05", "0.40", "0.005", 128_000, 400_000),
    ("gpt-4.1", "2.00", "8.00", "0.50", 32_768, 1_047_576),
    ("gpt-4.1-mini", "0.40", "1.60", "0.10", 32_768, 1_047_576),
    ("gpt-4o", "2.50", "10.00", "1.25", 16_384, 128_000),
    ("gpt-4o-mini", "0.15", "0.60", "0.075", 16_384, 128_000),
    ("o4-mini", "1.10", "4.40", "0.275", 100_000, 200_000),
)
_EMBEDDING_MODELS = (
    ("text-embedding-3-small", "0.02", 8_191),
    ("text-embedding-3-large", "0.13", 8_191),
)


def _price(inp: str, out: str, cache_read: str) -> PriceConfig:
    return PriceConfig(
        scheme="per_token",
        options={
            "input": Decimal(inp),
            "output": Decimal(out),
            "cache_write": Decimal(inp),
            "cache_read": Decimal(cache_read),
        },
    )


class OpenAIProvider(ProviderType):
    """``provider = "openai"``: upstream speaks ``openai-chat``; the key goes in
    ``Authorization: Bearer``."""

    name: ClassVar[str] = "openai"
    protocol: ClassVar[str | None] = "openai-chat"
    default_base_url: ClassVar[str | None] = "https://api.openai.com/v1"
    env_key: ClassVar[str | None] = "OPENAI_API_KEY"
    operations: ClassVar[frozenset[str]] = frozenset({"chat", "embeddings"})

    def auth_headers(self) -> dict[str, str]:
        key = self.upstream.api_key
        # a keyless OpenAI-compatible server (local vLLM, llama.cpp) gets no header
        return {"Authorization": f"Bearer {key}"} if key else {}

    @classmethod
    def default_models(cls, upstream_name: str) -> list[ModelConfig]:
        models = [
            ModelConfig(
                name=name,
                upstream=upstream_name,
                max_output_tokens=max_out,
                context_window=ctx,
                price=_price(inp, out, cached),
            )
            for name, inp, out, cached, max_out, ctx in _CHAT_MODELS
        ]
        models += [
            ModelConfig(
                name=name,
                upstream=upstream_name,
                kind="embedding",
                max_output_tokens=1,
                context_window=ctx,
                price=_price(inp, "0", "0"),
            )
            for name, inp, ctx in _EMBEDDING_MODELS
        ]
        return models
