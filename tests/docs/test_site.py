"""The documentation site's build checks (docs/_ext/), on small inputs; CI builds the real site
with ``mkdocs build --strict``."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import griffe
import pytest
from mkdocs.exceptions import PluginError

EXT = Path(__file__).resolve().parents[2] / "docs" / "_ext"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_ext_{name}", EXT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


api_coverage = _load("api_coverage")
sphinx_roles = _load("sphinx_roles")


def test_public_names_are_every_all_entry_of_the_public_modules():
    names = api_coverage.public_names()
    for module_name in ("luong_attention", "luong_attention.luong", "luong_attention.nnx"):
        module = importlib.import_module(module_name)
        assert module_name in names
        assert {f"{module_name}.{n}" for n in module.__all__} <= set(names)
    assert not any(".date_demo" in n or ".tools" in n or "._src" in n for n in names)


def test_a_public_name_without_an_anchor_fails_the_build(tmp_path):
    names = api_coverage.public_names()
    page = tmp_path / "api" / "x" / "index.html"
    page.parent.mkdir(parents=True)
    page.write_text("".join(f'<h2 id="{n}">' for n in names if n != "luong_attention.causal_mask"))
    with pytest.raises(PluginError, match=r"luong_attention\.causal_mask$"):
        api_coverage.on_post_build({"site_dir": str(tmp_path)})
    page.write_text("".join(f'<h2 id="{n}">' for n in names))
    api_coverage.on_post_build({"site_dir": str(tmp_path)})


PACKAGE = {
    "__init__.py": '"""See :func:`helper` and :class:`~pkg.Thing`."""\n'
    "from pkg._impl import Thing, helper\n"
    '__all__ = ["Thing", "helper"]\n',
    "_impl.py": '"""Private."""\n\n'
    "def helper():\n"
    '    """Calls :func:`_hidden`, :meth:`Thing.run` and :func:`gone`.\n\n'
    "    Example usage::\n\n"
    "      >>> helper()\n"
    '    """\n\n'
    "def _hidden():\n"
    '    """Private."""\n\n'
    "class Thing:\n"
    '    """A thing."""\n\n'
    "    def run(self):\n"
    '        """Runs."""\n',
}


def test_sphinx_roles_become_links_code_or_broken_references(tmp_path):
    for name, text in PACKAGE.items():
        (tmp_path / "pkg").mkdir(exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    extensions = griffe.load_extensions(sphinx_roles.SphinxRoles())
    package = griffe.load("pkg", search_paths=[tmp_path], extensions=extensions)
    assert package.docstring.value == "See [`helper`][pkg.helper] and [`Thing`][pkg.Thing]."
    helper = package["_impl"]["helper"].docstring.value
    # A private name is code, an exported class's method a link to its public path, an
    # unknown name stays an unresolved reference (the strict build fails on it).
    assert helper.startswith("Calls `_hidden`, [`Thing.run`][pkg.Thing.run] and [`gone`][gone].")
    assert "Examples:\n  >>> helper()" in helper
