"""cheapproxy plugin: protocol ``openai-chat`` and provider type ``openai``."""

from __future__ import annotations

from typing import Any, Callable

from cheapproxy import hookimpl


@hookimpl
def register_protocols(register: Callable[[Any], None]) -> None:
    from .codec import OpenAIChatProtocol

    register(OpenAIChatProtocol())


@hookimpl
def register_provider_types(register: Callable[[type], None]) -> None:
    from .provider import OpenAIProvider

    register(OpenAIProvider)
