"""cheapproxy plugin: provider type ``ark`` (Seedance video tasks through the
Volcengine Ark content-generation task API)."""

from __future__ import annotations

from typing import Callable

from cheapproxy import hookimpl


@hookimpl
def register_provider_types(register: Callable[[type], None]) -> None:
    from .provider import ArkProvider

    register(ArkProvider)
