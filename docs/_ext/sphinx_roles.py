"""Griffe extension: the docstrings' Sphinx roles become cross-references of the site.

The library's docstrings name other objects the Sphinx way (``:func:`attention```,
``:class:`~luong_attention.luong.DecoderState```). mkdocstrings renders Markdown, so before
rendering each role becomes:

* a link (an autorefs cross-reference ``[`name`][public.path]``) when it names an object that
  a public module exports, or a member of one (``mkdocs build --strict`` then fails if that
  page or anchor goes missing);
* plain code when it names something private (``_src`` internals, private helpers), which has
  no page to link to;
* a link to the one exported object of that name when the name is not in the docstring's
  scope (as Sphinx searches: ``DecoderState`` naming ``AttentionalDecoderCell``, the
  first such object in module order);
* an unresolved cross-reference, which fails the strict build, when the name resolves to
  nothing at all (a renamed or deleted object).

The reST literal block that introduces the doctest examples (``Example usage::`` and a blank
line) becomes a Google-style ``Examples:`` section, which mkdocstrings renders as code.

Loaded by mkdocstrings-python (``extensions`` in ``mkdocs.yml``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import griffe

EXAMPLES = re.compile(r"^([ \t]*)Example usage::\n[ \t]*\n", re.MULTILINE)
ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):`(~?)([\w.]+)`")
# The application and the tools are not library API: they have no reference pages.
NOT_API = ("date_demo", "tools")


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    """``obj`` and every object defined (not imported) inside it."""
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


def _public_modules(package: griffe.Module) -> list[griffe.Module]:
    """The package and its public submodules, the application and tools left out."""
    return [package] + [
        package.modules[name]
        for name in sorted(package.modules)
        if not name.startswith("_") and name not in NOT_API
    ]


def _exported(package: griffe.Module) -> dict[str, str]:
    """Canonical path -> documented path, for the public modules and what they export."""
    exported: dict[str, str] = {}
    for module in _public_modules(package):
        exported[module.path] = module.path
        for name, member in module.members.items():
            if member.is_public and not member.is_module:
                canonical = member.final_target.path if member.is_alias else member.path
                exported.setdefault(canonical, f"{module.path}.{name}")
    return exported


def _public_path(path: str, exported: dict[str, str], loader: griffe.GriffeLoader) -> str | None:
    """The documented path of ``path``, or of the exported class it is a member of."""
    if path in exported:
        return exported[path]
    owner, _, member = path.rpartition(".")
    if owner in exported and loader.modules_collection[owner].is_class:
        return f"{exported[owner]}.{member}"
    return None


def _by_name(name: str, exported: dict[str, str]) -> str | None:
    """The first exported object called ``name`` (as Sphinx searches), else ``None``.

    First in the order of :func:`_public_modules`: the package, then its submodules
    alphabetically (``luong`` before ``nnx``).
    """
    return next((public for public in exported.values() if public.rpartition(".")[2] == name), None)


def _resolve(obj: griffe.Object, target: str, loader: griffe.GriffeLoader) -> str | None:
    """The canonical path that ``target`` names from ``obj``'s scope, or ``None``."""
    first, _, rest = target.partition(".")
    try:
        path = obj.resolve(first) if first != obj.package.name else first
    except griffe.NameResolutionError:
        return None
    path = f"{path}.{rest}" if rest else path
    try:
        found = loader.modules_collection[path]
    except KeyError:
        return None
    return found.final_target.path if found.is_alias else found.path


class SphinxRoles(griffe.Extension):
    """Rewrites ``:role:`target``` in every docstring of the package (see the module doc)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **_: Any) -> None:
        """Runs once the whole package is loaded, so every name can be resolved."""
        exported = _exported(pkg)
        for obj in _objects(pkg):
            if obj.docstring is None:
                continue

            def rewrite(match: re.Match[str], scope: griffe.Object = obj) -> str:
                tilde, target = match.groups()
                shown = target.rpartition(".")[2] if tilde else target
                canonical = _resolve(scope, target, loader)
                if canonical is None:
                    public = _by_name(target, exported)
                    # Unresolved, it stays a cross-reference: the strict build fails on it.
                    return f"[`{shown}`][{public or target}]"
                public = _public_path(canonical, exported, loader)
                return f"`{shown}`" if public is None else f"[`{shown}`][{public}]"

            text = EXAMPLES.sub(r"\1Examples:\n", obj.docstring.value)
            obj.docstring.value = ROLE.sub(rewrite, text)
