"""cheapproxy-gemini: the ``gemini`` protocol and the ``gemini`` provider type."""

from __future__ import annotations

from typing import Any, Callable

from cheapproxy import hookimpl


@hookimpl
def register_protocols(register: Callable[[Any], None]) -> None:
    from .codec import GeminiProtocol

    register(GeminiProtocol())


@hookimpl
def register_provider_types(register: Callable[[type], None]) -> None:
    from .provider import GeminiProvider

    register(GeminiProvider)
