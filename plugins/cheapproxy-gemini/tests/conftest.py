"""Fixtures for the gemini plugin tests (helpers live in gemini_helpers.py)."""

from __future__ import annotations

from typing import Any

import pytest

from cheapproxy.testing.fake_gemini import make_app
from cheapproxy_gemini.codec import GeminiProtocol


@pytest.fixture
def protocol() -> GeminiProtocol:
    return GeminiProtocol()


@pytest.fixture
async def fake(aiohttp_server: Any) -> Any:
    """The fake Gemini upstream; ``fake.log`` holds every request it got."""
    log: list[dict[str, Any]] = []
    server = await aiohttp_server(make_app(log))
    server.log = log
    return server
