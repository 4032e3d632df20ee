"""API keys: generation, hashing, extraction from requests, an in-memory cache
(the hot path never hits the database to authenticate), and per-key policy."""

from __future__ import annotations

import asyncio
import datetime as dt
import fnmatch
import hashlib
import hmac
import ipaddress
import secrets
import time
from typing import TYPE_CHECKING

from aiohttp import web

from .errors import ProxyError
from .storage.base import KeyRecord

if TYPE_CHECKING:
    from .storage.base import Storage

KEY_PREFIX = "cp-"


def new_secret() -> str:
    """A new API key: 32 random bytes (256 bits), url-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(6)


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def extract_key(request: web.Request) -> str | None:
    """The client's key from Authorization: Bearer, x-api-key, x-goog-api-key or ?key=."""
    h = request.headers
    auth = h.get("Authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    for name in ("x-api-key", "x-goog-api-key"):
        v = h.get(name)
        if v:
            return v.strip()
    q = request.query.get("key")
    if q:
        return q
    return None


class KeyCache:
    """Key hash -> KeyRecord, loaded lazily and kept in memory.

    Revocation through this process invalidates at once; changes made by other
    processes sharing the database are picked up by polling ``keys_version``
    every ``refresh_seconds`` (a revoked key is refused within that time).
    Unknown hashes are remembered briefly (negative cache) so that a flood of
    bad keys does not become a flood of database reads.
    """

    def __init__(self, storage: Storage, *, refresh_seconds: float = 5.0, negative_max: int = 10000) -> None:
        self.storage = storage
        self.refresh_seconds = refresh_seconds
        self._pos: dict[str, KeyRecord] = {}
        self._neg: dict[str, float] = {}
        # secret -> digest for keys found (a SHA-256 per request costs more
        # than the rest of the lookup); never grows for unknown keys
        self._digests: dict[str, str] = {}
        self._negative_max = negative_max
        self._version: int | None = None
        self._checked = 0.0
        self._lock = asyncio.Lock()
        self._loading: dict[str, asyncio.Future[KeyRecord | None]] = {}  # key reads in flight

    async def _maybe_refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.refresh_seconds:
            return
        self._checked = now
        version = await self.storage.keys_version()
        if version != self._version:
            self._version = version
            self._pos.clear()
            self._neg.clear()
            self._digests.clear()

    async def lookup(self, secret: str) -> KeyRecord | None:
        if len(secret) > 512:
            return None
        digest = self._digests.get(secret) or hash_key(secret)
        await self._maybe_refresh()
        rec = self._pos.get(digest)
        if rec is not None:
            # compare in constant time although the dict lookup already matched
            return rec if hmac.compare_digest(rec.key_hash, digest) else None
        if digest in self._neg and time.monotonic() - self._neg[digest] < self.refresh_seconds:
            return None
        # one database read per key however many requests ask at once (the
        # first burst after a start would read it once per request); the read
        # is a task of its own, so a caller that goes away does not cancel it
        # for the others
        task = self._loading.get(digest)
        if task is None:
            task = self._loading[digest] = asyncio.ensure_future(self.storage.get_key_by_hash(digest))
            task.add_done_callback(lambda _t, d=digest: self._loading.pop(d, None))
        rec = await asyncio.shield(task)
        if rec is None:
            if len(self._neg) >= self._negative_max:
                self._neg.clear()
            self._neg[digest] = time.monotonic()
            return None
        self._pos[digest] = rec
        if len(self._digests) >= self._negative_max:
            self._digests.clear()
        self._digests[secret] = digest
        return rec

    def invalidate(self) -> None:
        self._pos.clear()
        self._neg.clear()
        self._digests.clear()
        self._checked = 0.0

    def note_spent(self, key_id: str, spent_delta: object) -> None:
        """Keep cached per-key spend roughly current (the database enforces caps)."""


async def authenticate(request: web.Request, cache: KeyCache) -> KeyRecord:
    secret = extract_key(request)
    if not secret:
        raise ProxyError(
            "authentication",
            "Missing API key: send it as 'Authorization: Bearer KEY', 'x-api-key', 'x-goog-api-key' or '?key='.",
            code="invalid_api_key",
        )
    rec = await cache.lookup(secret)
    if rec is None:
        raise ProxyError("authentication", "Invalid API key.", code="invalid_api_key")
    if rec.revoked:
        raise ProxyError("authentication", "This API key has been revoked.", code="invalid_api_key")
    if rec.expires_at is not None:
        exp = rec.expires_at if rec.expires_at.tzinfo else rec.expires_at.replace(tzinfo=dt.timezone.utc)
        if exp <= dt.datetime.now(dt.timezone.utc):
            raise ProxyError("authentication", "This API key has expired.", code="invalid_api_key")
    if rec.allow_ips:
        check_ip(request.remote, rec.allow_ips)
    return rec


def check_ip(remote: str | None, cidrs: list[str]) -> None:
    try:
        addr = ipaddress.ip_address(remote or "")
    except ValueError:
        raise ProxyError("permission", "This API key is not allowed from this client address.") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    for c in cidrs:
        try:
            if addr in ipaddress.ip_network(c, strict=False):
                return
        except ValueError:
            continue
    raise ProxyError("permission", "This API key is not allowed from this client address.")


def model_allowed(key: KeyRecord, names: list[str]) -> bool:
    """True when any of ``names`` (the registered name and the name asked for)
    matches one of the key's model globs.  The registered name must match: an
    alias cannot widen access."""
    if not key.models:
        return True
    canonical = names[0]
    return any(fnmatch.fnmatchcase(canonical, g) for g in key.models)


def check_model(key: KeyRecord, canonical: str, *, stream: bool) -> None:
    if not model_allowed(key, [canonical]):
        raise ProxyError("permission", f"This API key is not allowed to use model '{canonical}'.", param="model")
    if stream and key.no_stream:
        raise ProxyError("permission", "This API key is not allowed to stream; send stream=false.", param="stream")
