"""cheapproxy plugin: provider type ``openai-video`` (video tasks through the
OpenAI Videos API)."""

from __future__ import annotations

from typing import Callable

from cheapproxy import hookimpl


@hookimpl
def register_provider_types(register: Callable[[type], None]) -> None:
    from .provider import OpenAIVideoProvider

    register(OpenAIVideoProvider)
