"""Configuration: TOML -> attrs, unknown keys refused, ${ENV}, errors name file/table/key."""

from decimal import Decimal

import pytest

from cheapproxy.catalog import build_catalog, with_defaults
from cheapproxy.config import Config, load_config
from cheapproxy.errors import ConfigError
from cheapproxy.registry import build_registry


def write(tmp_path, text):
    p = tmp_path / "cheapproxy.toml"
    p.write_text(text)
    return p


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8787
    assert cfg.server.database == "sqlite:///cheapproxy.db"


def test_full_file_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_UPSTREAM_KEY", "s3cret-value")
    p = write(tmp_path, """
[server]
port = 9999
max_body_bytes = 1000

[[upstreams]]
name = "main"
provider = "openai"
base_url = "http://127.0.0.1:1/v1"
api_key = "${MY_UPSTREAM_KEY}"
first_byte_timeout = 7.5

[[models]]
name = "gpt-x"
aliases = ["gx"]
upstream = "main"
upstream_model = "gpt-x-2025"
[models.price]
input = 2.50
output = 10
cache_read = 1.25
""")
    cfg = load_config(p)
    assert cfg.server.port == 9999 and cfg.server.max_body_bytes == 1000
    up = cfg.upstreams[0]
    assert up.api_key == "s3cret-value" and up.first_byte_timeout == 7.5
    m = cfg.models[0]
    assert m.sent_name == "gpt-x-2025" and m.upstreams == ["main"]
    assert cfg.base_dir == str(tmp_path)
    catalog = build_catalog(cfg, build_registry())
    model = catalog.resolve("gx")
    assert model is catalog.resolve("gpt-x")
    assert model.scheme.options.input == Decimal("2.50")


@pytest.mark.parametrize(
    "text, where",
    [
        ("[server]\nprot = 1\n", "server"),
        ("[server]\nport = \"x\"\n", "port"),
        ("[nosuch]\na = 1\n", None),
        ("[[upstreams]]\nname = \"a\"\nprovider = \"openai\"\ntypo_key = 1\n", "typo_key"),
        ("[[upstreams]]\nname = \"a\"\nprovider = \"nope\"\n", "provider"),
        ("[[models]]\nname = \"m\"\nupstream = \"missing\"\n", "upstream"),
        ("[[upstreams]]\nname = \"a\"\nprovider = \"demo\"\n[[models]]\nname = \"m\"\nupstream = \"a\"\n[models.price]\ninptu = 1\n", "inptu"),
        ("[[upstreams]]\nname = \"a\"\nprovider = \"demo\"\n[[models]]\nname = \"m\"\nupstream = \"a\"\n[[models]]\nname = \"n\"\naliases = [\"m\"]\nupstream = \"a\"\n", "aliases"),
        ("[[upstreams]]\nname = \"a\"\nprovider = \"demo\"\n[[upstreams]]\nname = \"a\"\nprovider = \"demo\"\n", "name"),
        ("[[upstreams]]\nname = \"a\"\nprovider = \"demo\"\napi_key = \"${CHEAPPROXY_TEST_UNSET_VAR}\"\n", "CHEAPPROXY_TEST_UNSET_VAR"),
        ("this is not toml = = \n", "invalid TOML"),
    ],
)
def test_errors_name_file_table_key(tmp_path, text, where):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        cfg = load_config(p)
        if "nosuch" in text:
            raise AssertionError("unknown table accepted: " + repr(cfg.extra))
        build_catalog(with_defaults(cfg, build_registry()), build_registry())
    msg = str(ei.value)
    assert str(p) in msg
    if where:
        assert where in msg, msg


def test_unknown_top_level_table_is_refused(tmp_path):
    p = write(tmp_path, "[nosuch]\na = 1\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert "nosuch" in str(ei.value)


def test_config_example_is_valid(monkeypatch):
    """config.example.toml documents every key and must itself load."""
    import pathlib

    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "ARK_API_KEY"):
        monkeypatch.setenv(var, "example")
    path = pathlib.Path(__file__).parent.parent / "config.example.toml"
    cfg = load_config(path)
    reg = build_registry()
    catalog = build_catalog(with_defaults(cfg, reg), reg)
    assert catalog.models


def test_with_defaults_registers_env_upstreams(monkeypatch):
    reg = build_registry()
    env = {"OPENAI_API_KEY": "k1"}
    cfg = with_defaults(Config(), reg, env)
    names = {u.provider for u in cfg.upstreams}
    assert "demo" in names and "openai" in names
    assert "demo" in {m.name for m in cfg.models}
    cfg2 = with_defaults(Config(), reg, {})
    assert {u.provider for u in cfg2.upstreams} == {"demo"}
