"""Registered models, their aliases and upstreams, validated against the
registry.  Only names in the catalog are ever served."""

from __future__ import annotations

import os
from typing import Any

import attrs

from .config import Config, ModelConfig, UpstreamConfig, structure_options
from .errors import ConfigError
from .protocol import Protocol
from .provider import ProviderType
from .registry import Registry

KINDS = {"chat", "embedding", "image", "video", "audio"}


@attrs.define(eq=False)
class Upstream:
    config: UpstreamConfig
    provider: ProviderType
    protocol: Protocol | None

    @property
    def name(self) -> str:
        return self.config.name


@attrs.define(eq=False)
class Model:
    config: ModelConfig
    upstreams: list[Upstream]
    scheme: Any  # a PricingScheme instance

    @property
    def name(self) -> str:
        return self.config.name


@attrs.define
class Catalog:
    models: dict[str, Model]  # registered name -> model
    by_name: dict[str, Model]  # name and every alias -> model
    upstreams: dict[str, Upstream]

    def resolve(self, name: str) -> Model | None:
        return self.by_name.get(name)


def with_defaults(config: Config, registry: Registry, environ: dict[str, str] | None = None) -> Config:
    """Add the zero-config parts: upstreams for provider types whose standard
    environment variable is set (only when the config defines no upstreams at
    all) and the demo upstream/models (unless [server] demo is off or the
    names are taken)."""
    env = os.environ if environ is None else environ
    ups = list(config.upstreams)
    models = list(config.models)
    taken_up = {u.name for u in ups}
    taken_models = {m.name for m in models} | {a for m in models for a in m.aliases}
    candidates: list[type[ProviderType]] = []
    if not config.upstreams:
        candidates += [c for c in registry.provider_types.values() if c.env_key and env.get(c.env_key)]
    if config.server.demo and "demo" in registry.provider_types:
        candidates.append(registry.provider_types["demo"])
    for cls in sorted(candidates, key=lambda c: c.name):
        up_name = cls.name if cls.name not in taken_up else f"{cls.name}-env"
        if up_name in taken_up:
            continue
        ups.append(UpstreamConfig(name=up_name, provider=cls.name, api_key=env.get(cls.env_key) if cls.env_key else None))
        taken_up.add(up_name)
        for m in cls.default_models(up_name):
            if m.name in taken_models or any(a in taken_models for a in m.aliases):
                continue
            models.append(m)
            taken_models.add(m.name)
            taken_models.update(m.aliases)
    return attrs.evolve(config, upstreams=ups, models=models)


def build_catalog(config: Config, registry: Registry) -> Catalog:
    file = config.path
    upstreams: dict[str, Upstream] = {}
    for i, uc in enumerate(config.upstreams):
        table = f"upstreams[{i}]"
        if uc.name in upstreams:
            raise ConfigError(f"duplicate upstream name {uc.name!r}", file=file, table=table, key="name")
        cls = registry.provider_types.get(uc.provider)
        if cls is None:
            known = ", ".join(sorted(registry.provider_types)) or "none"
            raise ConfigError(f"unknown provider type {uc.provider!r} (known: {known})", file=file, table=table, key="provider")
        opts = structure_options(cls.options_class, uc.options, file=file, table=table)
        provider = cls(uc, opts)
        proto = registry.protocols.get(cls.protocol) if cls.protocol else None
        upstreams[uc.name] = Upstream(config=uc, provider=provider, protocol=proto)
    models: dict[str, Model] = {}
    by_name: dict[str, Model] = {}
    for i, mc in enumerate(config.models):
        table = f"models[{i}]"
        if mc.kind not in KINDS:
            raise ConfigError(f"unknown kind {mc.kind!r} (one of {', '.join(sorted(KINDS))})", file=file, table=table, key="kind")
        ups = []
        for uname in mc.upstreams:
            if uname not in upstreams:
                raise ConfigError(f"model {mc.name!r} points at missing upstream {uname!r}", file=file, table=table, key="upstream")
            ups.append(upstreams[uname])
        scheme_cls = registry.pricing_schemes.get(mc.price.scheme)
        if scheme_cls is None:
            known = ", ".join(sorted(registry.pricing_schemes)) or "none"
            raise ConfigError(f"unknown pricing scheme {mc.price.scheme!r} (known: {known})", file=file, table=f"{table}.price", key="scheme")
        opts = structure_options(scheme_cls.options_class, mc.price.options, file=file, table=f"{table}.price")
        model = Model(config=mc, upstreams=ups, scheme=scheme_cls(opts))
        for n, key in [(mc.name, "name")] + [(a, "aliases") for a in mc.aliases]:
            if n in by_name:
                raise ConfigError(f"duplicate model name or alias {n!r}", file=file, table=table, key=key)
            by_name[n] = model
        models[mc.name] = model
    return Catalog(models=models, by_name=by_name, upstreams=upstreams)
