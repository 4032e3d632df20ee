"""Exception hierarchy.  Request-path code raises ProxyError; the pipeline renders
it through the inbound protocol's encode_error (never web.HTTPException)."""

from __future__ import annotations


class CheapproxyError(Exception):
    """Root of every cheapproxy exception."""


class ConfigError(CheapproxyError):
    """Invalid configuration; the message names file, table and key."""

    def __init__(self, message: str, *, file: str | None = None, table: str | None = None, key: str | None = None):
        self.file, self.table, self.key = file, table, key
        where = ": ".join(x for x in (file, ".".join(y for y in (table, key) if y) or None) if x)
        super().__init__(f"{where}: {message}" if where else message)


class PluginError(CheapproxyError):
    """A plugin failed to load or registered something invalid."""


class StartupError(CheapproxyError):
    """A plugin or the core refuses to start (plugin config validation etc.)."""


class StorageError(CheapproxyError):
    """The storage backend failed."""


# neutral kinds -> default HTTP status
KIND_STATUS = {
    "authentication": 401,
    "permission": 403,
    "not_found": 404,
    "invalid_request": 400,
    "payload_too_large": 413,
    "insufficient_balance": 402,
    "rate_limited": 429,
    "overloaded": 503,
    "upstream_rejected": 400,
    "upstream_failed": 502,
    "upstream_overloaded": 529,
    "upstream_timeout": 504,
    "unavailable": 503,
    "internal": 500,
}


class ProxyError(CheapproxyError):
    """An error answered to a client, in the client's protocol shape.

    ``kind`` is one of KIND_STATUS; ``status`` defaults from it.  ``message`` is
    shown to the client: it must never contain a credential.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: int | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status or KIND_STATUS.get(kind, 500)
        self.param = param
        self.retry_after = retry_after
        self.code = code


class UpstreamError(ProxyError):
    """The upstream answered with an error status (or failed to answer)."""

    def __init__(self, kind: str, message: str, *, status: int | None = None, upstream_status: int | None = None,
                 retry_after: float | None = None, retryable: bool = False):
        super().__init__(kind, message, status=status, retry_after=retry_after)
        self.upstream_status = upstream_status
        self.retryable = retryable


def kind_for_upstream_status(status: int) -> str:
    """Map an upstream HTTP status to a neutral kind (keeps the status class)."""
    if status == 401 or status == 403:
        # the *gateway's* credential was refused: a server-side problem for the client
        return "upstream_failed"
    if status == 404:
        return "not_found"
    if status == 413:
        return "payload_too_large"
    if status == 429:
        return "rate_limited"
    if status in (503, 529):
        return "upstream_overloaded"
    if status == 504:
        return "upstream_timeout"
    if 400 <= status < 500:
        return "upstream_rejected"
    return "upstream_failed"
