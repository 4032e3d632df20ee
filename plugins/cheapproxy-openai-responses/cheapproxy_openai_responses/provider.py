"""The ``openai-responses`` provider type: an upstream that speaks the OpenAI
Responses API (api.openai.com or any compatible server)."""

from __future__ import annotations

from decimal import Decimal
from typing import ClassVar

from cheapproxy.config import ModelConfig, PriceConfig
from cheapproxy.provider import ProviderType

from .common import PROTOCOL

# (name, input, cached input, output) in USD per 1M tokens, OpenAI list prices.
# Only models served by the Responses API alone: the chat models belong to the
# ``openai`` provider type, which reads the same OPENAI_API_KEY.
_DEFAULT_MODELS: tuple[tuple[str, str, str, str, str], ...] = (
    ("gpt-5-codex", "1.25", "0.125", "10.00", "GPT-5 Codex (Responses API only)"),
    ("gpt-5.1-codex", "1.25", "0.125", "10.00", "GPT-5.1 Codex (Responses API only)"),
    ("gpt-5.1-codex-mini", "0.25", "0.025", "2.00", "GPT-5.1 Codex mini (Responses API only)"),
    ("codex-mini-latest", "1.50", "0.375", "6.00", "Codex mini (Responses API only)"),
    ("gpt-5-pro", "15.00", "15.00", "120.00", "GPT-5 pro (Responses API only)"),
)


class OpenAIResponsesProvider(ProviderType):
    """Bearer-key upstream at ``{base_url}/responses`` (base includes ``/v1``)."""

    name: ClassVar[str] = "openai-responses"
    protocol: ClassVar[str | None] = PROTOCOL
    default_base_url: ClassVar[str | None] = "https://api.openai.com/v1"
    env_key: ClassVar[str | None] = "OPENAI_API_KEY"
    operations: ClassVar[frozenset[str]] = frozenset({"chat"})

    def auth_headers(self) -> dict[str, str]:
        """Our upstream key; nothing from the client ever goes here."""
        key = self.upstream.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    @classmethod
    def default_models(cls, upstream_name: str) -> list[ModelConfig]:
        models = []
        for name, inp, cached, out, desc in _DEFAULT_MODELS:
            price = PriceConfig(scheme="per_token", options={
                # OpenAI bills cache writes as ordinary input
                "input": Decimal(inp), "output": Decimal(out), "cache_write": Decimal(inp), "cache_read": Decimal(cached),
            })
            models.append(ModelConfig(name=name, upstream=upstream_name, kind="chat", max_output_tokens=128_000,
                                      context_window=400_000, description=desc, price=price))
        return models
