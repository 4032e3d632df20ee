"""``[server] database`` URLs for the PostgreSQL backend.

``postgresql://user:password@host:5432/db?schema=cheapproxy&pool_max_size=10``

The options below are cheapproxy's and are removed before the URL reaches
asyncpg; every other query parameter is asyncpg's own (``sslmode``,
``sslrootcert``, ``host``, ``port``, ``passfile``, ...) or, when asyncpg does
not know it, a server setting sent at connect time (``statement_timeout``,
``application_name``, ``search_path``, ...).

* ``schema``: the schema holding cheapproxy's tables (created on first open);
  default: the login role's ``search_path`` (normally ``public``).
* ``pool_min_size`` / ``pool_max_size``: connections per gateway process
  (default 1 / 10).
* ``pool_timeout``: seconds to wait for a free connection before the request
  fails with a storage error (default 30).
* ``statement_cache_size``: asyncpg's prepared-statement cache (default 100;
  0 behind PgBouncer in transaction mode).

Server settings cheapproxy sends unless the URL gives them:
``application_name=cheapproxy`` and ``idle_in_transaction_session_timeout=60s``.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import attrs

from cheapproxy.errors import StorageError

SCHEMES = ("postgresql", "postgres")
_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_OURS = ("schema", "pool_min_size", "pool_max_size", "pool_timeout", "statement_cache_size")


@attrs.frozen(kw_only=True)
class PostgresURL:
    dsn: str = attrs.field(repr=False)  # what asyncpg gets; may hold a password
    display: str  # the URL with any password masked: safe for logs and errors
    secrets: tuple[str, ...] = attrs.field(repr=False)  # the password as written and decoded, for log scrubbing
    schema: str | None
    server_settings: dict[str, str]
    min_size: int = 1
    max_size: int = 10
    acquire_timeout: float = 30.0
    statement_cache_size: int = 100


def _int(name: str, raw: str, low: int, high: int) -> int:
    if not re.fullmatch(r"[0-9]{1,6}", raw) or not low <= int(raw) <= high:
        raise StorageError(f"invalid PostgreSQL URL option {name}={raw!r}: expected a whole number from {low} to {high}")
    return int(raw)


def _join(scheme: str, netloc: str, path: str, query: str) -> str:
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")


def _mask(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        auth, _, host = netloc.rpartition("@")
        if ":" in auth:
            auth = auth.split(":", 1)[0] + ":***"
        netloc = f"{auth}@{host}"
    query = urlencode([(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)],
                      safe="*,/:")
    return _join(parts.scheme, netloc, parts.path, query)


def parse_url(url: str) -> PostgresURL:
    """Split ``url`` into the asyncpg DSN and cheapproxy's pool options.
    ``postgresql+asyncpg://`` (SQLAlchemy style) is accepted as ``postgresql://``."""
    if not isinstance(url, str):
        raise StorageError("the database URL must be a string")
    parts = urlsplit(url)
    scheme = parts.scheme.split("+")[0]
    if scheme not in SCHEMES:
        raise StorageError(f"not a PostgreSQL URL (expected postgresql://...): {_mask(url)}")
    if parts.fragment:
        raise StorageError(f"invalid PostgreSQL URL {_mask(url)}: no #fragment allowed")
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise StorageError(f"invalid PostgreSQL URL {_mask(url)}: malformed query string") from None
    ours: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    for k, v in pairs:
        if k in _OURS:
            if k in ours:
                raise StorageError(f"invalid PostgreSQL URL {_mask(url)}: {k} given twice")
            ours[k] = v
        else:
            rest.append((k, v))
    schema = ours.get("schema")
    if schema is not None:
        if not _SCHEMA_RE.fullmatch(schema):
            raise StorageError(f"invalid PostgreSQL URL option schema={schema!r}: use lower-case letters, digits and _ "
                               "(at most 63, not starting with a digit)")
        if any(k == "search_path" for k, _ in rest):
            raise StorageError("invalid PostgreSQL URL: give either schema= or search_path=, not both")
    min_size = _int("pool_min_size", ours.get("pool_min_size", "1"), 0, 10_000)
    max_size = _int("pool_max_size", ours.get("pool_max_size", "10"), 1, 10_000)
    if min_size > max_size:
        raise StorageError(f"invalid PostgreSQL URL: pool_min_size ({min_size}) is above pool_max_size ({max_size})")
    timeout = _int("pool_timeout", ours.get("pool_timeout", "30"), 1, 3600)
    cache = _int("statement_cache_size", ours.get("statement_cache_size", "100"), 0, 100_000)
    settings: dict[str, str] = {}
    if schema is not None:
        settings["search_path"] = schema
    given = {k for k, _ in rest}
    if "application_name" not in given:
        settings["application_name"] = "cheapproxy"  # recognisable in pg_stat_activity
    if "idle_in_transaction_session_timeout" not in given:
        # a frozen gateway process must not keep other instances waiting on its row locks forever
        settings["idle_in_transaction_session_timeout"] = "60s"
    dsn = _join("postgresql", parts.netloc, parts.path, urlencode(rest))
    found = [parts.password or "", unquote(parts.password or "")] + [v for k, v in rest if k == "password"]
    return PostgresURL(dsn=dsn, display=_mask(dsn), secrets=tuple(sorted({p for p in found if p})), schema=schema,
                       server_settings=settings,
                       min_size=min_size, max_size=max_size, acquire_timeout=float(timeout), statement_cache_size=cache)
