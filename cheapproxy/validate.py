"""Ingress validation shared by every protocol: strict JSON and bounds.

orjson already refuses NaN/Infinity, invalid UTF-8 and nesting deeper than
1024 levels; we add "must be an object" and clear messages.
"""

from __future__ import annotations

from typing import Any

import orjson

from .errors import ProxyError


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise ProxyError("invalid_request", "Request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        msg = str(exc)
        if "recursion" in msg.lower():
            msg = "nesting is too deep"
        raise ProxyError("invalid_request", f"Request body is not valid JSON: {msg}") from None
    if not isinstance(body, dict):
        raise ProxyError("invalid_request", "Request body must be a JSON object.")
    return body


def _int_field(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ProxyError("invalid_request", f"'{name}' must be a whole number.", param=name)
    return value


def requested_max_tokens(body: dict[str, Any]) -> int | None:
    """The output limit the client asked for, whatever its protocol calls it."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        if name in body and body[name] is not None:
            return _int_field(body[name], name)
    gc = body.get("generationConfig") or body.get("generation_config")
    if isinstance(gc, dict):
        for name in ("maxOutputTokens", "max_output_tokens"):
            if gc.get(name) is not None:
                return _int_field(gc[name], name)
    return None
