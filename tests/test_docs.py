"""Meta-tests that keep the plugin API and the docs honest (datasette style).

* every hookspec has docs/hooks/<name>.md headed by its exact signature, is
  linked from docs/plugin-hooks.md, and has a ``test_hook_<name>`` test;
* every CLI command, subcommand and option is in docs/cli.md;
* every key of every config table is in config.example.toml and in
  docs/configuration.md, under its own table;
* every Markdown link between docs files resolves;
* the writing-plugins tutorial shows the example plugin's real files.
"""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path
from typing import Any, Iterator

import attrs
import click
import pluggy
import pytest

from cheapproxy import config as config_module
from cheapproxy import hookspecs
from cheapproxy.cli import cli

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _without_code(text: str) -> str:
    """The text with fenced code blocks blanked out, offsets kept (headings
    and links in code are not headings and links)."""
    return re.sub(r"^(```|~~~).*?^\1[ \t]*$", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.S | re.M)


def _headings(text: str) -> list[tuple[int, str]]:
    return [(len(m.group(1)), m.group(2).strip()) for m in re.finditer(r"^(#{1,6})\s+(.*)$", _without_code(text), re.M)]


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading, body up to the next heading of any level) pairs."""
    clean = _without_code(text)
    marks = list(re.finditer(r"^#{1,6}\s+(.*)$", clean, re.M))
    out = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        out.append((m.group(1).strip(), text[m.end():end]))
    return out


# ---------------------------------------------------------------- hooks


def _hook_names() -> list[str]:
    return sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "cheapproxy_spec"))


def _argnames(name: str) -> tuple[str, ...]:
    pm = pluggy.PluginManager("cheapproxy")
    pm.add_hookspecs(hookspecs)
    spec = getattr(pm.hook, name).spec
    assert spec is not None
    return tuple(spec.argnames)


HOOKS = _hook_names()


def test_hookspecs_are_found():
    assert {"register_provider_types", "register_protocols", "track_event", "lifespan"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_exact_signature(hook):
    page = DOCS / "hooks" / f"{hook}.md"
    assert page.is_file(), f"{page.relative_to(ROOT)} is missing"
    first = _headings(_read(page))[0]
    assert first == (1, f"`{hook}({', '.join(_argnames(hook))})`")


def test_no_hook_page_without_a_hook():
    pages = {p.stem for p in (DOCS / "hooks").glob("*.md")}
    assert pages <= set(HOOKS), f"pages for hooks that do not exist: {sorted(pages - set(HOOKS))}"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_in_the_hook_index(hook):
    assert f"(hooks/{hook}.md)" in _read(DOCS / "plugin-hooks.md")


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    tree = ast.parse(_read(ROOT / "tests" / "test_hooks.py"))
    tests = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert f"test_hook_{hook}" in tests


# ---------------------------------------------------------------- CLI


def _commands(group: click.Group, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    for name, cmd in sorted(group.commands.items()):
        path = f"{prefix}{name}"
        yield path, cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path + " ")


COMMANDS = list(_commands(cli))


def test_cli_commands_are_found():
    names = {p for p, _ in COMMANDS}
    assert {"serve", "check", "plugins", "users add", "keys create", "usage", "topup", "tasks show"} <= names


def _command_section(path: str) -> str | None:
    pattern = re.compile(rf"`cheapproxy {re.escape(path)}[ `]")
    for heading, body in _sections(_read(DOCS / "cli.md")):
        if pattern.search(heading):
            return heading + "\n" + body
    return None


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS])
def test_every_cli_command_is_documented(path):
    section = _command_section(path)
    assert section is not None, f"docs/cli.md has no heading for `cheapproxy {path}`"
    cmd = dict(COMMANDS)[path]
    for param in cmd.params:
        if isinstance(param, click.Option):
            flag = max(param.opts, key=len)
            assert flag in section, f"`cheapproxy {path}` option {flag} is not documented"
        else:
            assert param.name.upper() in section, f"`cheapproxy {path}` argument {param.name.upper()} is not documented"


def test_global_cli_options_are_documented():
    text = _read(DOCS / "cli.md")
    for param in cli.params:
        flag = max(param.opts, key=len)
        assert f"`{flag}" in text, flag
    assert "`--version`" in text


# ---------------------------------------------------------------- configuration


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(config_module))


def _config_tables() -> list[tuple[str, type]]:
    """(TOML header, attrs class) for every table of Config, nested tables too."""
    out: list[tuple[str, type]] = []

    def visit(path: str, tp: Any, array: bool) -> None:
        out.append((f"[[{path}]]" if array else f"[{path}]", tp))
        for f in attrs.fields(tp):
            sub = _hints(tp)[f.name]
            if attrs.has(sub):
                visit(f"{path}.{f.name}", sub, False)

    hints = _hints(config_module.Config)
    for name in sorted(config_module.CORE_TABLES):
        tp = hints[name]
        array = typing.get_origin(tp) is list
        visit(name, typing.get_args(tp)[0] if array else tp, array)
    return out


def _config_keys() -> list[tuple[str, str, bool]]:
    """(header, key, is_table) for every key the TOML may hold."""
    keys = []
    for header, cls in _config_tables():
        for f in attrs.fields(cls):
            if f.name == "options":  # the provider's / scheme's own keys, documented by the plugin
                continue
            keys.append((header, f.name, attrs.has(_hints(cls)[f.name])))
    return keys


CONFIG_KEYS = _config_keys()


def test_config_tables_are_found():
    headers = {h for h, _ in _config_tables()}
    assert {"[server]", "[[upstreams]]", "[[models]]", "[models.price]", "[routing]", "[billing]", "[plugins]",
            "[tasks]"} <= headers


def _toml_sections(text: str) -> dict[str, str]:
    """TOML header -> the text of every table with that header (commented keys included)."""
    out: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^\s*(\[\[?[A-Za-z0-9_.]+\]\]?)", line)
        if m:
            current = m.group(1)
            out.setdefault(current, "")
        elif current is not None:
            out[current] += line + "\n"
    return out


@pytest.mark.parametrize(("header", "key", "is_table"), CONFIG_KEYS, ids=[f"{h}{k}" for h, k, _ in CONFIG_KEYS])
def test_every_config_key_is_in_the_example(header, key, is_table):
    sections = _toml_sections(_read(ROOT / "config.example.toml"))
    if is_table:
        sub = header.strip("[]") + "." + key
        assert f"[{sub}]" in sections, f"config.example.toml has no [{sub}] table"
        return
    assert header in sections, f"config.example.toml has no {header} table"
    assert re.search(rf"(?m)^\s*#?\s*{key}\s*=", sections[header]), f"config.example.toml: {header} lacks {key}"


@pytest.mark.parametrize(("header", "key", "is_table"), CONFIG_KEYS, ids=[f"{h}{k}" for h, k, _ in CONFIG_KEYS])
def test_every_config_key_is_in_the_configuration_docs(header, key, is_table):
    text = _read(DOCS / "configuration.md")
    if is_table:
        sub = header.strip("[]") + "." + key
        assert any(f"`[{sub}]`" in h for h, _ in _sections(text)), f"docs/configuration.md has no `[{sub}]` heading"
        return
    bodies = [body for h, body in _sections(text) if f"`{header}`" in h]
    assert bodies, f"docs/configuration.md has no heading for `{header}`"
    assert any(f"`{key}`" in b for b in bodies), f"docs/configuration.md: {header} does not document `{key}`"


# ---------------------------------------------------------------- links


DOC_FILES = sorted(DOCS.rglob("*.md"))


def _slug(heading: str) -> str:
    """GitHub-style anchor of a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def _broken_links(path: Path) -> list[str]:
    text = _without_code(_read(path))
    broken = []
    for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(target)
            continue
        if anchor and dest.suffix == ".md":
            if anchor not in {_slug(h) for _, h in _headings(_read(dest))}:
                broken.append(target)
    return broken


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def test_markdown_links_resolve(path):
    broken = _broken_links(path)
    assert not broken, f"{path.relative_to(ROOT)}: broken links {broken}"


def test_readme_links_resolve():
    broken = _broken_links(ROOT / "README.md")
    assert not broken, f"README.md: broken links {broken}"


def test_index_lists_every_page():
    index = _read(DOCS / "index.md")
    toctree = re.search(r"```\{toctree\}\n(.*?)```", index, re.S)
    assert toctree, "docs/index.md has no toctree"
    entries = [line.strip() for line in toctree.group(1).splitlines() if line.strip() and not line.startswith(":")]
    for entry in entries:
        assert (DOCS / f"{entry}.md").is_file(), f"toctree entry {entry} has no page"
    pages = {p.stem for p in DOCS.glob("*.md")} - {"index"}
    assert pages <= set(entries), f"pages missing from the toctree: {sorted(pages - set(entries))}"


# ---------------------------------------------------------------- the tutorial


@pytest.mark.parametrize("relpath", ["pyproject.toml", "cheapproxy_example_echo/__init__.py"])
def test_tutorial_shows_the_finished_example_plugin(relpath):
    """The last listing of each file in docs/writing-plugins.md is the file in
    tests/example_plugin/, byte for byte."""
    text = _read(DOCS / "writing-plugins.md")
    listings = re.findall(rf"^```\w*\n# {re.escape(relpath)}\n(.*?)^```", text, re.S | re.M)
    assert listings, f"docs/writing-plugins.md shows no listing headed '# {relpath}'"
    assert listings[-1] == _read(ROOT / "tests" / "example_plugin" / relpath)


# ---------------------------------------------------------------- runnable examples


def _listing(doc: str, relpath: str) -> str:
    text = _read(DOCS / doc)
    found = re.findall(rf"^```python\n# {re.escape(relpath)}\n(.*?)^```", text, re.S | re.M)
    assert found, f"docs/{doc} shows no listing headed '# {relpath}'"
    return found[-1]


def _install_example_plugin(site: Path) -> None:
    """What ``pip install`` of tests/example_plugin leaves behind: the package
    and a dist-info with its entry points (written here, so the source tree
    stays clean and no network or build step is needed)."""
    import shutil
    import tomllib

    meta = tomllib.loads(_read(ROOT / "tests" / "example_plugin" / "pyproject.toml"))["project"]
    shutil.copytree(ROOT / "tests" / "example_plugin" / "cheapproxy_example_echo", site / "cheapproxy_example_echo")
    info = site / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    eps = "".join(f"{k} = {v}\n" for k, v in meta["entry-points"]["cheapproxy"].items())
    (info / "entry_points.txt").write_text("[cheapproxy]\n" + eps)


def test_docs_test_examples_pass(tmp_path):
    """The test files shown in the tutorial and in testing-plugins run green
    against the finished example plugin, as a plugin author would run them."""
    import os
    import subprocess
    import sys

    site = tmp_path / "site"
    _install_example_plugin(site)
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_shout.py").write_text(_listing("writing-plugins.md", "tests/test_shout.py"))
    (tests / "test_with_fakes.py").write_text(_listing("testing-plugins.md", "tests/test_with_fakes.py"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "asyncio_mode=auto", str(tests)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "4 passed" in res.stdout
