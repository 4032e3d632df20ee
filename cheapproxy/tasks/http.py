"""HTTP helpers for task providers: one JSON call with errors mapped the way
the rest of the gateway maps them, and messages that never carry a credential."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from ..errors import UpstreamError, kind_for_upstream_status
from ..upstream import scrub

MAX_BODY = 1024 * 1024  # provider answers are small JSON objects


class JSONReply:
    """A provider's answer: status, parsed JSON body (None when not JSON), headers."""

    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, body: Any, headers: Any) -> None:
        self.status, self.body, self.headers = status, body, headers


async def call_json(session: aiohttp.ClientSession, method: str, url: str, *, upstream: str,
                    headers: dict[str, str] | None = None, json_body: Any = None, secrets: list[str] | None = None,
                    timeout_seconds: float | None = None) -> JSONReply:
    """Send one request and read a JSON answer of any status.  Connection
    failures and timeouts raise a retryable ``UpstreamError``."""
    hdrs = dict(headers or {})
    data = None
    if json_body is not None:
        data = orjson.dumps(json_body)
        hdrs.setdefault("Content-Type", "application/json")
    try:
        async with asyncio.timeout(timeout_seconds):
            async with session.request(method, url, data=data, headers=hdrs, allow_redirects=False) as resp:
                raw = await resp.content.read(MAX_BODY)
                status, resp_headers = resp.status, resp.headers
    except TimeoutError:
        raise UpstreamError("upstream_timeout", f"upstream {upstream!r} did not answer in time", retryable=True) from None
    except (aiohttp.ClientError, OSError) as exc:
        msg = scrub(f"{type(exc).__name__}: {exc}", secrets or [])
        raise UpstreamError("upstream_failed", f"upstream {upstream!r} could not be reached ({msg})",
                            retryable=True) from None
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        body = None
    return JSONReply(status, body, resp_headers)


def error_detail(body: Any) -> str:
    """The message of an OpenAI/Ark style error body (``{"error": {...}}``)."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            msg = err.get("message")
            code = err.get("code")
            if isinstance(msg, str) and msg:
                return f"{msg} ({code})" if isinstance(code, str) and code else msg
        elif isinstance(err, str):
            return err
        if isinstance(body.get("message"), str):
            return body["message"]
    return ""


def upstream_error(reply: JSONReply, upstream: str, secrets: list[str] | None = None) -> UpstreamError:
    """Map an error status to the gateway's error (as ``UpstreamClient`` does):
    a refused credential is the operator's problem (502, body never relayed),
    other 4xx keep their status, 5xx become 502 and are retryable."""
    status = reply.status
    if status in (401, 403):
        return UpstreamError("upstream_failed", f"upstream {upstream!r} refused the gateway's credentials "
                             f"(HTTP {status}); the operator must fix the upstream api_key",
                             upstream_status=status, retryable=True)
    detail = scrub(error_detail(reply.body), secrets or [])[:500]
    retryable = status in (408, 409, 425, 429) or status >= 500
    msg = f"upstream {upstream!r} returned HTTP {status}" + (f": {detail}" if detail else "")
    return UpstreamError(kind_for_upstream_status(status), msg, status=status if 400 <= status < 500 else None,
                         upstream_status=status, retryable=retryable)


async def get_task_object(session: aiohttp.ClientSession, url: str, *, upstream: str, headers: dict[str, str],
                          secrets: list[str] | None, task_id: str) -> Any:
    """GET a provider's task object: TaskNotFound on 404 (the provider forgot
    it), the upstream's error on other failures, else the parsed body."""
    from .base import TaskNotFound

    reply = await call_json(session, "GET", url, upstream=upstream, headers=headers, secrets=secrets)
    if reply.status == 404:
        raise TaskNotFound(task_id)
    if reply.status >= 400:
        raise upstream_error(reply, upstream, secrets)
    return reply.body
