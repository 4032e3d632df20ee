"""The registry: name -> object maps filled by the registration hooks, with
provenance (which plugin registered what) and duplicate refusal."""

from __future__ import annotations

from typing import Any, Callable

import attrs
import pluggy

from .errors import PluginError
from .plugins import PluginInfo, call_registration, make_plugin_manager
from .protocol import Protocol
from .provider import ProviderType


@attrs.define
class Registry:
    pm: pluggy.PluginManager
    plugins: dict[str, PluginInfo]
    provider_types: dict[str, type[ProviderType]] = attrs.Factory(dict)
    protocols: dict[str, Protocol] = attrs.Factory(dict)
    pricing_schemes: dict[str, type] = attrs.Factory(dict)
    storage_backends: dict[str, Callable[..., Any]] = attrs.Factory(dict)
    routes: list[tuple[str, str, Callable[..., Any], str]] = attrs.Factory(list)
    owners: dict[tuple[str, str], str] = attrs.Factory(dict)  # (kind, name) -> plugin

    def _claim(self, kind: str, name: str, plugin: str) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {kind} without a name")
        prev = self.owners.get((kind, name))
        if prev is not None:
            d1 = self.plugins[prev].distribution if prev in self.plugins else "?"
            d2 = self.plugins[plugin].distribution if plugin in self.plugins else "?"
            raise PluginError(
                f"duplicate {kind} {name!r}: registered by plugin {prev!r} (distribution {d1!r}) "
                f"and by plugin {plugin!r} (distribution {d2!r})"
            )
        self.owners[(kind, name)] = plugin

    def _accept(self, plugin: str, args: tuple[Any, ...], kind: str) -> str:
        if kind == "provider_types":
            (cls,) = args
            self._claim(kind, getattr(cls, "name", ""), plugin)
            self.provider_types[cls.name] = cls
            return cls.name
        if kind == "protocols":
            (codec,) = args
            self._claim(kind, getattr(codec, "name", ""), plugin)
            self.protocols[codec.name] = codec
            return codec.name
        if kind == "pricing_schemes":
            (cls,) = args
            self._claim(kind, getattr(cls, "name", ""), plugin)
            self.pricing_schemes[cls.name] = cls
            return cls.name
        if kind == "storage_backends":
            scheme, factory = args
            self._claim(kind, scheme, plugin)
            self.storage_backends[scheme] = factory
            return scheme
        if kind == "routes":
            method, path, handler = args
            self._claim(kind, f"{method.upper()} {path}", plugin)
            self.routes.append((method.upper(), path, handler, plugin))
            return f"{method.upper()} {path}"
        raise AssertionError(kind)


def build_registry(
    *, autoload: bool = True, plugins: list[tuple[str, Any]] | tuple[()] = (), disable: list[str] | tuple[()] = ()
) -> Registry:
    pm, infos = make_plugin_manager(autoload=autoload, plugins=plugins, disable=disable)
    reg = Registry(pm=pm, plugins=infos)
    for hook, kind in (
        ("register_protocols", "protocols"),
        ("register_provider_types", "provider_types"),
        ("register_pricing_schemes", "pricing_schemes"),
        ("register_storage_backends", "storage_backends"),
        ("register_routes", "routes"),
    ):
        call_registration(pm, hook, infos, kind, reg._accept)
    for name, cls in reg.provider_types.items():
        if cls.protocol is not None and cls.protocol not in reg.protocols:
            owner = reg.owners.get(("provider_types", name), "?")
            raise PluginError(
                f"plugin {owner!r}: provider type {name!r} speaks protocol {cls.protocol!r}, which no plugin registers"
            )
    return reg
