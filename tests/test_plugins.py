"""Plugin discovery and failure handling (entry points only, first-party included)."""

import importlib
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from cheapproxy import hookimpl
from cheapproxy.errors import PluginError
from cheapproxy.registry import build_registry

ROOT = Path(__file__).parent.parent


def test_first_party_plugins_load_through_entry_points():
    reg = build_registry()
    for name in ("sqlite", "per_token", "demo", "openai", "openai-responses", "anthropic", "gemini"):
        assert name in reg.plugins, name
    assert reg.plugins["demo"].distribution == "cheapproxy"
    assert reg.plugins["openai"].distribution == "cheapproxy-openai"
    assert set(reg.protocols) >= {"openai-chat", "openai-responses", "anthropic-messages", "gemini"}
    assert set(reg.provider_types) >= {"openai", "openai-responses", "anthropic", "gemini", "demo"}
    assert "sqlite" in reg.storage_backends and "per_token" in reg.pricing_schemes
    # provenance: what each plugin registered
    assert reg.plugins["anthropic"].provides["protocols"] == ["anthropic-messages"]
    assert reg.plugins["demo"].provides["provider_types"] == ["demo"]


def test_every_default_plugin_module_has_an_entry_point():
    import importlib.metadata as md

    declared = {ep.value for ep in md.entry_points(group="cheapproxy")}
    pkg = ROOT / "cheapproxy" / "default_plugins"
    modules = {f"cheapproxy.default_plugins.{p.stem}" for p in pkg.glob("*.py") if p.stem != "__init__"}
    assert modules <= declared, modules - declared


def test_duplicate_registration_stops_startup_naming_both():
    dup = types.ModuleType("dup_plugin")

    class Fake:
        name = "demo"
        protocol = None

    dup.register_provider_types = hookimpl(lambda register: register(Fake))
    with pytest.raises(PluginError) as ei:
        build_registry(plugins=[("dup", dup)])
    msg = str(ei.value)
    assert "duplicate provider_types 'demo'" in msg
    assert "'dup'" in msg and "'demo'" in msg and "'cheapproxy'" in msg


def test_misspelt_hook_stops_startup_naming_plugin():
    bad = types.ModuleType("typo_plugin")
    bad.register_protocol = hookimpl(lambda register: None)  # missing "s"
    with pytest.raises(PluginError) as ei:
        build_registry(plugins=[("typo", bad)])
    assert "typo" in str(ei.value) and "register_protocol" in str(ei.value)


def _fake_dist(site: Path, dist: str, ep_name: str, module: str, code: str) -> None:
    info = site / f"{dist.replace('-', '_')}-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(f"[cheapproxy]\n{ep_name} = {module}\n")
    (site / f"{module}.py").write_text(textwrap.dedent(code))


def test_plugin_that_fails_to_import_is_named_with_its_distribution(tmp_path, monkeypatch):
    _fake_dist(tmp_path, "cheapproxy-broken", "broken", "cheapproxy_broken", "raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.raises(PluginError) as ei:
        build_registry()
    msg = str(ei.value)
    assert "'broken'" in msg and "'cheapproxy-broken'" in msg and "boom at import" in msg
    # and the CLI refuses to start with one clear line
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "cheapproxy", "check"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode != 0
    assert "cheapproxy-broken" in res.stderr and "Traceback" not in res.stderr


def test_disabled_plugin_is_not_loaded(tmp_path, monkeypatch):
    _fake_dist(tmp_path, "cheapproxy-broken2", "broken2", "cheapproxy_broken2", "raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    reg = build_registry(disable=["broken2"])
    assert "broken2" not in reg.plugins


def test_pip_installed_example_plugin_is_discovered_and_usable(tmp_path):
    """A separately packaged plugin installed with pip shows up in `cheapproxy
    plugins` and its provider type works from TOML, with no core change."""
    target = tmp_path / "site"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(ROOT / "tests" / "example_plugin")],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-m", "cheapproxy", "plugins", "--json"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["example-echo"]["distribution"] == "cheapproxy-example-echo"
    assert rows["example-echo"]["version"] == "1.2.3"
    assert rows["example-echo"]["provides"] == {"provider_types": ["shout"]}
    cfg = tmp_path / "cheapproxy.toml"
    cfg.write_text(textwrap.dedent(f"""
        [server]
        database = "sqlite:///{tmp_path}/x.db"
        [[upstreams]]
        name = "loud"
        provider = "shout"
        suffix = "!!!"
        [[models]]
        name = "shouty"
        upstream = "loud"
    """))
    chk = subprocess.run([sys.executable, "-m", "cheapproxy", "--config", str(cfg), "check"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert chk.returncode == 0, chk.stderr
    # a typo in the plugin's own key is refused with file, table and key
    cfg.write_text(cfg.read_text().replace("suffix", "sufix"))
    bad = subprocess.run([sys.executable, "-m", "cheapproxy", "--config", str(cfg), "check"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode != 0 and "sufix" in bad.stderr and "upstreams[0]" in bad.stderr
