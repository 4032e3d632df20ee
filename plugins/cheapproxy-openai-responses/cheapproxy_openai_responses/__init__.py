"""cheapproxy plugin: the ``openai-responses`` protocol and provider type."""

from __future__ import annotations

from typing import Any, Callable

from cheapproxy import hookimpl


@hookimpl
def register_protocols(register: Callable[[Any], None]) -> None:
    from .codec import ResponsesProtocol

    register(ResponsesProtocol())


@hookimpl
def register_provider_types(register: Callable[[type], None]) -> None:
    from .provider import OpenAIResponsesProvider

    register(OpenAIResponsesProvider)
