"""The documentation site's build checks (docs/_ext/), on small inputs; CI builds the real site
with ``mkdocs build --strict``."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
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


# --- The rendered site (one strict build, shared by the checks below) ------------------------

ROOT = EXT.parents[1]
# reST that Markdown leaves as text: a directive (".. note::") or a Sphinx role (":func:`x`").
REST = re.compile(r"\.\. [\w-]+::|:(?:func|class|mod|meth|attr|data|exc|obj|ref):`")
# Docstring sections whose first column names one parameter or attribute a row.
NAMED_SECTIONS = ("Parameters:", "Other Parameters:", "Attributes:")
# A Raises row's type: one exception, or several as a tuple ("(ValueError, TypeError)").
EXCEPTIONS = re.compile(r"[\w.]+|\([\w.]+(, [\w.]+)+\)")


@dataclass
class Section:
    """A docstring section as rendered: its title, the object it documents (its anchor) and
    that object's signature (``""`` when it shows none), and the first cell of each row."""

    title: str
    owner: str
    signature: str
    first_cells: list[str] = field(default_factory=list)


class RenderedPage(HTMLParser):
    """The text a reader sees outside code, and the docstring section tables, of one page.

    Relies on the markup of mkdocstrings-python: a ``doc-heading`` per object, its signature
    in a ``doc-signature`` block, a ``doc-section-title`` span above each section's table.
    """

    def __init__(self, html: str) -> None:
        super().__init__()
        self.prose: list[str] = []
        self.sections: list[Section] = []
        self._skipped = 0  # depth inside code, pre, script and style
        self._signature: list[str] | None = None  # None: outside a signature block
        self._owner, self._last_signature = "", ""
        self._title: list[str] | None = None
        self._titled: Section | None = None  # a section whose table has not started yet
        self._table: Section | None = None
        self._cell: list[str] | None = None
        self._row_cells = 0
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        if "doc-heading" in classes:
            self._owner, self._last_signature = dict(attrs).get("id") or "", ""
        elif "doc-signature" in classes:
            self._signature = []
        elif "doc-section-title" in classes:
            self._title = []
        elif tag == "table":
            self._table, self._titled = self._titled, None
        elif tag == "tr" and self._table is not None and "doc-section-item" in classes:
            self._row_cells = 0
        elif tag == "td" and self._table is not None:
            self._row_cells += 1
            if self._row_cells == 1:
                self._cell = []
        if tag in ("code", "pre", "script", "style"):
            self._skipped += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("code", "pre", "script", "style"):
            self._skipped -= 1
        if tag == "pre" and self._signature is not None:
            self._last_signature, self._signature = "".join(self._signature), None
        elif tag == "span" and self._title is not None:
            title, self._title = "".join(self._title).strip(), None
            self._titled = Section(title, self._owner, self._last_signature)
            self.sections.append(self._titled)
        elif tag == "td" and self._cell is not None:
            self._table.first_cells.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        for sink in (self._signature, self._title, self._cell):
            if sink is not None:
                sink.append(data)
        if not self._skipped:
            self.prose.append(data)


def returned_values(signature: str) -> int | None:
    """How many values the signature's return annotation has: n for ``tuple[...]`` of n
    items, else 1; ``None`` when the signature shows no return annotation."""
    _, arrow, annotation = signature.rpartition("->")
    if not arrow:
        return None
    node = ast.parse(annotation.strip(), mode="eval").body
    if not (isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("tuple", "Tuple")):
        return 1
    items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    variadic = any(isinstance(item, ast.Constant) and item.value is ... for item in items)
    return 1 if variadic else len(items)


def raw_markup(page: RenderedPage) -> list[str]:
    """Lines of the page's prose with a backtick or reST left unconverted."""
    lines = "".join(page.prose).splitlines()
    return [line.strip() for line in lines if "`" in line or REST.search(line)]


def misread_sections(page: RenderedPage) -> list[str]:
    """Section tables whose rows are not what the docstring documents: a Returns table with
    more rows than the return annotation has values (1, or n or 1 for a ``tuple`` of n), a
    parameter or attribute row named by something other than one identifier, a Raises row
    whose type is not exceptions."""
    problems = []
    for section in page.sections:
        if section.title == "Returns:":
            count = returned_values(section.signature)
            rows = len(section.first_cells)
            if count is None or rows not in {1, count}:
                problems.append(f"{section.owner}: {rows} Returns rows for {count} returned values")
        elif section.title in NAMED_SECTIONS:
            problems += [
                f"{section.owner}: {section.title} row {cell!r}"
                for cell in section.first_cells
                if not cell.lstrip("*").isidentifier()
            ]
        elif section.title == "Raises:":
            problems += [
                f"{section.owner}: Raises row {cell!r}"
                for cell in section.first_cells
                if not EXCEPTIONS.fullmatch(cell)
            ]
    return problems


def _page(returns: int, names: str = "x", raised: str = "ValueError", prose: str = "") -> str:
    """A page in mkdocstrings' markup: ``f(x) -> tuple[int, int]`` with the given rows."""

    def table(title: str, cells: list[str]) -> str:
        rows = "".join(f'<tr class="doc-section-item"><td>{c}</td><td>d</td></tr>' for c in cells)
        return f'<p><span class="doc-section-title">{title}</span></p><table>{rows}</table>'

    return "\n".join(
        [
            '<h2 id="pkg.f" class="doc doc-heading">f</h2>',
            '<div class="doc-signature"><pre><code>f(x) -&gt; tuple[int, int]</code></pre></div>',
            f"<p>{prose}<code>``kept``</code></p>",
            table("Parameters:", [f"<code>{names}</code>"]),
            table("Returns:", ["<code>int</code>"] * returns),
            table("Raises:", [f"<code>{raised}</code>"]),
        ]
    )


def test_the_checks_find_what_griffe_and_markdown_leave_wrong():
    for rows in (1, 2):
        assert misread_sections(RenderedPage(_page(rows))) == []
    assert raw_markup(RenderedPage(_page(1))) == []
    assert misread_sections(RenderedPage(_page(3, "w_a, v_a", "for bad input"))) == [
        "pkg.f: Parameters: row 'w_a, v_a'",
        "pkg.f: 3 Returns rows for 2 returned values",
        "pkg.f: Raises row 'for bad input'",
    ]
    for prose in (".. note::", "see :func:`g`", "``[batch...,"):
        assert raw_markup(RenderedPage(_page(1, prose=prose))) == [prose]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RenderedPage]:
    """Every page of the site built as CI builds it (strict), by path."""
    site_dir = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    return {
        str(page.relative_to(site_dir)): RenderedPage(page.read_text(encoding="utf-8"))
        for page in sorted(site_dir.rglob("*.html"))
    }


def test_the_site_shows_no_raw_markup(site: dict[str, RenderedPage]) -> None:
    found = [f"{path}: {line}" for path, page in site.items() for line in raw_markup(page)]
    assert not found, "\n".join(found)


def test_every_docstring_section_renders_as_written(site: dict[str, RenderedPage]) -> None:
    assert sum(s.title == "Returns:" for page in site.values() for s in page.sections) > 20
    found = [f"{path}: {p}" for path, page in site.items() for p in misread_sections(page)]
    assert not found, "\n".join(found)
