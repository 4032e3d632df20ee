"""cheapproxy plugin: protocol ``anthropic-messages`` and provider type ``anthropic``."""

from __future__ import annotations

from typing import Any, Callable

from cheapproxy import hookimpl

from .codec import AnthropicMessagesProtocol
from .provider import AnthropicProvider


@hookimpl
def register_protocols(register: Callable[[Any], None]) -> None:
    register(AnthropicMessagesProtocol())


@hookimpl
def register_provider_types(register: Callable[[type], None]) -> None:
    register(AnthropicProvider)
