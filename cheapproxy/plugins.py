"""Plugin loading: every plugin, first-party ones included, comes through the
``cheapproxy`` entry-point group.  Failures are collected and reported all at
once, naming the plugin and its distribution; the proxy refuses to start
half-loaded.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from types import ModuleType
from typing import Any, Callable, Iterable

import attrs
import pluggy

from . import hookspecs
from .errors import PluginError

GROUP = "cheapproxy"


@attrs.define(kw_only=True)
class PluginInfo:
    name: str
    distribution: str
    version: str
    module: str
    hooks: list[str] = attrs.Factory(list)
    provides: dict[str, list[str]] = attrs.Factory(dict)  # "protocols" -> [names]


def _dist_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"], dist.version


def make_plugin_manager(
    *, autoload: bool = True, plugins: Iterable[tuple[str, ModuleType | object]] = (), disable: Iterable[str] = ()
) -> tuple[pluggy.PluginManager, dict[str, PluginInfo]]:
    """A new PluginManager with entry-point plugins (unless ``autoload`` is
    False) plus the explicit ``(name, module)`` pairs given (tests).

    ``disable`` and ``$CHEAPPROXY_DISABLE_PLUGINS`` (comma separated) name
    plugins not to load.  Raises PluginError listing every failure.
    """
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}
    errors: list[str] = []
    blocked = set(disable) | {x.strip() for x in os.environ.get("CHEAPPROXY_DISABLE_PLUGINS", "").split(",") if x.strip()}
    if autoload:
        for ep in sorted(md.entry_points(group=GROUP), key=lambda e: e.name):
            dist, version = _dist_of(ep)
            if ep.name in blocked:
                continue
            if ep.name in infos:
                errors.append(
                    f"plugin {ep.name!r} from distribution {dist!r}: the name is already used by "
                    f"distribution {infos[ep.name].distribution!r}"
                )
                continue
            try:
                mod = ep.load()
            except Exception as exc:  # noqa: BLE001 - reported below, with its source
                errors.append(f"plugin {ep.name!r} from distribution {dist!r} failed to import: {type(exc).__name__}: {exc}")
                continue
            _register(pm, ep.name, mod, PluginInfo(name=ep.name, distribution=dist, version=version, module=ep.value), infos, errors)
    for name, mod in plugins:
        if name in blocked:
            continue
        if name in infos:
            errors.append(f"plugin {name!r}: the name is already used by distribution {infos[name].distribution!r}")
            continue
        modname = getattr(mod, "__name__", type(mod).__name__)
        _register(pm, name, mod, PluginInfo(name=name, distribution="(test)", version="-", module=modname), infos, errors)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        plugin = exc.plugin
        pname = pm.get_name(plugin) or "?"
        info = infos.get(pname)
        errors.append(f"plugin {pname!r} from distribution {info.distribution if info else '?'!r}: {exc}")
    if errors:
        raise PluginError("cannot start: " + "; ".join(errors))
    for name, info in infos.items():
        plugin = pm.get_plugin(name)
        info.hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or []) if plugin else []
    return pm, infos


def _register(pm: pluggy.PluginManager, name: str, mod: Any, info: PluginInfo, infos: dict[str, PluginInfo], errors: list[str]) -> None:
    try:
        pm.register(mod, name=name)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"plugin {name!r} from distribution {info.distribution!r}: {exc}")
        return
    infos[name] = info


def call_registration(
    pm: pluggy.PluginManager, hook: str, infos: dict[str, PluginInfo], kind: str, accept: Callable[[str, Any, str], None], **kwargs: Any
) -> None:
    """Call ``hook`` one implementation at a time with a ``register`` callback so
    that each registered object is attributed to its plugin."""
    caller = getattr(pm.hook, hook)
    for impl in reversed(caller.get_hookimpls()):
        pname = impl.plugin_name
        info = infos.get(pname)

        def register(*args: Any, _pname: str = pname, _info: PluginInfo | None = info) -> None:
            label = accept(_pname, args, kind)
            if _info is not None:
                _info.provides.setdefault(kind, []).append(label)

        try:
            impl.function(register=register, **kwargs)
        except PluginError:
            raise
        except Exception as exc:  # noqa: BLE001
            dist = info.distribution if info else "?"
            raise PluginError(f"plugin {pname!r} from distribution {dist!r} failed in {hook}: {type(exc).__name__}: {exc}") from exc
