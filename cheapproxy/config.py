"""Configuration: TOML -> ``${NAME}`` substitution -> attrs classes through one
cattrs converter that refuses unknown keys.  Every error names the file, the
table and the key.

Provider- and scheme-specific keys are structured in a second phase: the core
reads ``provider`` (or ``scheme``), then structures the remaining keys into that
type's own attrs class, so a plugin declares its settings and typos are refused.
"""

from __future__ import annotations

import os
import re
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any, Union

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, override

from .errors import ConfigError

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _positive(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attr.name} must be positive")


def _zero_or_more(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attr.name} must not be negative")


@attrs.frozen(kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8787
    database: str = "sqlite:///cheapproxy.db"
    max_body_bytes: int = attrs.field(default=32 * 2**20, validator=_positive)
    log_level: str = "info"
    log_format: str = "auto"  # json | console | auto (console on a TTY)
    access_log: bool = False
    shutdown_grace_seconds: float = attrs.field(default=30.0, validator=_zero_or_more)
    max_in_flight: int = attrs.field(default=4096, validator=_positive)
    max_in_flight_per_key: int = attrs.field(default=256, validator=_positive)
    # a connection must deliver a complete request head this soon after it opened
    # (or after its previous response); also the idle keep-alive timeout
    header_timeout_seconds: float = attrs.field(default=10.0, validator=_positive)
    body_timeout_seconds: float = attrs.field(default=30.0, validator=_positive)  # to read the whole request body
    send_timeout_seconds: float = attrs.field(default=60.0, validator=_positive)  # one write to a client that stopped reading
    disconnect_check_seconds: float = attrs.field(default=0.1, validator=_positive)  # how often waiting requests look for a vanished client
    demo: bool = True  # offer the built-in demo upstream and models (no upstream needed)
    drain_seconds: float = attrs.field(default=5.0, validator=_zero_or_more)  # after a client disconnect, keep reading the upstream this long for its usage
    first_user: str = "admin"  # created with one key on first start with an empty database
    first_user_balance: Decimal = Decimal("10.00")
    key_cache_seconds: float = 5.0  # how often the key cache checks for changes made by other processes
    # where rpm / tpm are counted: "memory" (this process alone), "database"
    # (shared by every process on the database), "auto" (database with
    # serve --workers N > 1 or a non-SQLite database, else memory)
    rate_limits: str = attrs.field(default="auto", validator=attrs.validators.in_(("auto", "memory", "database")))

    def shared_rate_limits(self, workers: int = 1) -> bool:
        if self.rate_limits == "auto":
            return workers > 1 or not self.database.startswith("sqlite:")
        return self.rate_limits == "database"


@attrs.frozen(kw_only=True)
class UpstreamConfig:
    name: str
    provider: str
    base_url: str | None = None
    api_key: str | None = None
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)
    first_byte_timeout: float = attrs.field(default=120.0, validator=_positive)
    idle_timeout: float = attrs.field(default=120.0, validator=_positive)
    max_connections: int = attrs.field(default=256, validator=_positive)
    weight: int = 1
    options: Any = None  # the provider type's own keys, structured in phase two


@attrs.frozen(kw_only=True)
class PriceConfig:
    scheme: str = "per_token"
    options: Any = None  # the scheme's own keys (input/output/... for per_token)


@attrs.frozen(kw_only=True)
class ModelConfig:
    name: str
    upstream: Union[str, list[str]]
    aliases: list[str] = attrs.Factory(list)
    upstream_model: str | None = None
    kind: str = "chat"  # chat | embedding | image | video | audio
    max_output_tokens: int = attrs.field(default=8192, validator=_positive)  # used for holds when the client gives none
    context_window: int = attrs.field(default=200_000, validator=_positive)
    description: str | None = None
    price: PriceConfig = attrs.Factory(PriceConfig)

    @property
    def upstreams(self) -> list[str]:
        return [self.upstream] if isinstance(self.upstream, str) else list(self.upstream)

    @property
    def sent_name(self) -> str:
        return self.upstream_model or self.name


@attrs.frozen(kw_only=True)
class PluginsConfig:
    disable: list[str] = attrs.Factory(list)


@attrs.frozen(kw_only=True)
class RoutingConfig:
    retries: int = attrs.field(default=2, validator=_zero_or_more)  # extra attempts beyond one per upstream
    deadline_seconds: float = attrs.field(default=300.0, validator=_positive)  # overall budget for all attempts before the first byte
    cooldown_after_failures: int = attrs.field(default=5, validator=_positive)
    cooldown_base_seconds: float = attrs.field(default=5.0, validator=_positive)
    cooldown_max_seconds: float = attrs.field(default=300.0, validator=_positive)
    pool_timeout_seconds: float = attrs.field(default=5.0, validator=_positive)  # wait for a free upstream connection, then 503
    retry_budget_percent: float = attrs.field(default=20.0, validator=_zero_or_more)  # retries allowed per 100 requests (per upstream) ...
    retry_budget_min: int = attrs.field(default=10, validator=_zero_or_more)  # ... plus this reserve
    retry_after_max_seconds: float = attrs.field(default=30.0, validator=_zero_or_more)  # longer upstream Retry-After: answered, not waited


@attrs.frozen(kw_only=True)
class BillingConfig:
    # holds estimate the prompt as ceil(request body bytes / prompt_bytes_per_token) tokens
    prompt_bytes_per_token: int = attrs.field(default=3, validator=_positive)
    sweep_interval_seconds: float = attrs.field(default=60.0, validator=_positive)
    hold_ttl_seconds: float = 3600.0


def _non_negative(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attr.name} must not be negative")


@attrs.frozen(kw_only=True)
class TasksConfig:
    """``[tasks]``: async video / image / audio tasks (see docs/tasks.md)."""

    poller: bool = True  # poll unfinished tasks from this process (every instance may; finalisation is a CAS)
    poll_interval_seconds: float = attrs.field(default=5.0, validator=_positive)  # first poll delay, back-off base
    poll_backoff: float = attrs.field(default=1.5, validator=_positive)  # each poll waits this factor longer
    max_poll_interval_seconds: float = attrs.field(default=60.0, validator=_positive)  # back-off ceiling
    poll_concurrency: int = attrs.field(default=32, validator=_positive)  # polls in flight per process
    poll_batch: int = attrs.field(default=200, validator=_positive)  # due tasks read per round
    deadline_seconds: float = attrs.field(default=7200.0, validator=_positive)  # unfinished after this: failed, released
    hold_max_usd: Decimal = attrs.field(default=Decimal("5.00"), validator=_non_negative)  # hold when no estimate
    public_base_url: str | None = None  # base of gateway URLs in task objects sent by webhook (else: relative)
    webhook_allow_private: bool = False  # allow callback_url on loopback / private / link-local addresses
    webhook_retries: int = attrs.field(default=5, validator=_non_negative)  # retries after the first attempt
    webhook_backoff_seconds: float = attrs.field(default=2.0, validator=_positive)  # first retry delay, doubling
    webhook_timeout_seconds: float = attrs.field(default=10.0, validator=_positive)  # per attempt
    webhook_secret: str | None = None  # when set: X-Cheapproxy-Signature: sha256=HMAC(secret, body)
    webhook_resume_scan: int = attrs.field(default=1000, validator=_positive)  # recent tasks checked at start


@attrs.frozen(kw_only=True)
class Config:
    server: ServerConfig = attrs.Factory(ServerConfig)
    upstreams: list[UpstreamConfig] = attrs.Factory(list)
    models: list[ModelConfig] = attrs.Factory(list)
    plugins: PluginsConfig = attrs.Factory(PluginsConfig)
    routing: RoutingConfig = attrs.Factory(RoutingConfig)
    billing: BillingConfig = attrs.Factory(BillingConfig)
    tasks: TasksConfig = attrs.Factory(TasksConfig)
    path: str | None = None  # the file it came from
    base_dir: str = "."


def make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(Decimal, lambda v, _: _decimal(v))
    conv.register_structure_hook(Union[str, list[str]], lambda v, _: _str_or_list(v))

    def _no_bool_for_number(tp: type) -> Any:
        def hook(v: Any, _: Any) -> Any:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"expected a number, got {type(v).__name__}")
            if tp is int and isinstance(v, float):
                raise ValueError("expected a whole number")
            return tp(v)
        return hook

    conv.register_structure_hook(int, _no_bool_for_number(int))
    conv.register_structure_hook(float, _no_bool_for_number(float))

    def _str(v: Any, _: Any) -> str:
        if not isinstance(v, str):
            raise ValueError(f"expected a string, got {type(v).__name__}")
        return v

    conv.register_structure_hook(str, _str)

    def _bool(v: Any, _: Any) -> bool:
        if not isinstance(v, bool):
            raise ValueError(f"expected true or false, got {type(v).__name__}")
        return v

    conv.register_structure_hook(bool, _bool)
    # options are structured in phase two; keep raw here
    for cls in (UpstreamConfig, PriceConfig):
        conv.register_structure_hook(
            cls, make_dict_structure_fn(cls, conv, _cattrs_forbid_extra_keys=True, options=override(omit=True))
        )
    return conv


def _decimal(v: Any) -> Decimal:
    if isinstance(v, bool):
        raise ValueError("expected a number")
    if isinstance(v, float):
        v = repr(v)  # TOML floats: keep the written digits, not the binary expansion
    d = Decimal(str(v))
    if not d.is_finite():
        raise ValueError("expected a finite number")
    return d


def _str_or_list(v: Any) -> str | list[str]:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
        return list(v)
    raise ValueError("expected an upstream name or a non-empty list of names")


CONVERTER = make_converter()


def substitute_env(value: Any, path: str = "") -> Any:
    """Replace ``${NAME}`` in every string with the environment value."""
    if isinstance(value, str):
        def rep(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in os.environ:
                raise ConfigError(f"environment variable {name} is not set", table=path or None)
            return os.environ[name]
        return _ENV.sub(rep, value)
    if isinstance(value, dict):
        return {k: substitute_env(v, f"{path}.{k}" if path else k) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


CORE_TABLES = {"server", "upstreams", "models", "plugins", "routing", "billing", "tasks"}
UPSTREAM_CORE_KEYS = {f.name for f in attrs.fields(UpstreamConfig)} - {"options"}
PRICE_CORE_KEYS = {"scheme"}


def _format_exc(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, KeyError):
        return "required key missing"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return f"unknown key(s): {', '.join(sorted(exc.extra_fields))}"
    if isinstance(exc, (ValueError, TypeError)) and str(exc):
        return f"invalid value: {exc}"
    name = getattr(type_, "__name__", str(type_))
    return f"invalid value for type, expected {name}"


def _describe(exc: BaseException, file: str | None, table: str) -> ConfigError:
    """Turn a cattrs error group into one ConfigError naming table and key."""
    if isinstance(exc, cattrs.ClassValidationError):
        msgs = cattrs.transform_error(exc, path="$", format_exception=_format_exc)
        # transform_error yields "message @ $.table.key"
        first = msgs[0] if msgs else str(exc)
        msg, _, where = first.rpartition(" @ ")
        where = where.removeprefix("$").removeprefix(".")
        if table:
            where = f"{table}.{where}" if where else table
        tbl, dot, key = where.rpartition(".")
        if not dot:  # the whole table is at fault (e.g. an unknown key in it)
            tbl, key = where, ""
        extra = f" (and {len(msgs) - 1} more problem(s))" if len(msgs) > 1 else ""
        return ConfigError((msg or first) + extra, file=file, table=tbl or table, key=key or None)
    return ConfigError(str(exc), file=file, table=table)


def parse_config(data: dict[str, Any], *, file: str | None = None, base_dir: str = ".") -> Config:
    """Phase one: the core tables (plugin-owned options stay raw dicts)."""
    try:
        data = substitute_env(data)
    except ConfigError as exc:
        raise ConfigError(str(exc), file=file) from None
    unknown = sorted(k for k in data if k not in CORE_TABLES)
    if unknown:
        raise ConfigError(f"unknown table or key {unknown[0]!r} (known: {', '.join(sorted(CORE_TABLES))})", file=file, key=unknown[0])
    core = dict(data)
    # keep the provider / scheme specific keys aside for phase two
    raw_up_opts: list[dict[str, Any]] = []
    for i, up in enumerate(core.get("upstreams", []) or []):
        if not isinstance(up, dict):
            raise ConfigError("each [[upstreams]] entry must be a table", file=file, table=f"upstreams[{i}]")
        raw_up_opts.append({k: v for k, v in up.items() if k not in UPSTREAM_CORE_KEYS})
        core["upstreams"][i] = {k: v for k, v in up.items() if k in UPSTREAM_CORE_KEYS}
    raw_price_opts: list[dict[str, Any]] = []
    for i, m in enumerate(core.get("models", []) or []):
        if not isinstance(m, dict):
            raise ConfigError("each [[models]] entry must be a table", file=file, table=f"models[{i}]")
        price = m.get("price", {})
        if not isinstance(price, dict):
            raise ConfigError("must be a table", file=file, table=f"models[{i}]", key="price")
        raw_price_opts.append({k: v for k, v in price.items() if k not in PRICE_CORE_KEYS})
        m = dict(m)
        m["price"] = {k: v for k, v in price.items() if k in PRICE_CORE_KEYS}
        core["models"][i] = m
    try:
        cfg = CONVERTER.structure(core, Config)
    except Exception as exc:  # noqa: BLE001 - reported with its location
        raise _describe(exc, file, "") from None
    ups = [attrs.evolve(u, options=o) for u, o in zip(cfg.upstreams, raw_up_opts)]
    models = [attrs.evolve(m, price=attrs.evolve(m.price, options=o)) for m, o in zip(cfg.models, raw_price_opts)]
    return attrs.evolve(cfg, upstreams=ups, models=models, path=file, base_dir=base_dir)


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read a TOML file (or return built-in defaults when ``path`` is None)."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", file=str(p)) from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"invalid TOML: {exc}", file=str(p)) from None
    return parse_config(data, file=str(p), base_dir=str(p.resolve().parent))


def find_config_path(explicit: str | None) -> str | None:
    """--config, else $CHEAPPROXY_CONFIG, else ./cheapproxy.toml if present."""
    if explicit:
        return explicit
    env = os.environ.get("CHEAPPROXY_CONFIG")
    if env:
        return env
    if Path("cheapproxy.toml").is_file():
        return "cheapproxy.toml"
    return None


def structure_options(cls: type, raw: dict[str, Any] | None, *, file: str | None, table: str) -> Any:
    """Phase two: structure a plugin's own keys into its attrs class."""
    try:
        return CONVERTER.structure(raw or {}, cls)
    except Exception as exc:  # noqa: BLE001
        raise _describe(exc, file, table) from None
