"""MkDocs hook: the build fails unless every public name has a documented entry in the API pages.

A public name is one listed in ``__all__`` of ``luong_attention`` or of one of its public
submodules (every submodule whose name has no leading underscore, except the application
``date_demo`` and the command-line ``tools``). mkdocstrings gives each documented object an
HTML anchor named by its path and leaves out objects without a docstring, so a missing anchor
means a public name that is undocumented or on no API page. A new public module (say
``luong_attention.keras``) fails the build until a page under ``docs/api/`` renders it.

Loaded by ``hooks`` in ``mkdocs.yml``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

PACKAGE = "luong_attention"
NOT_API = ("date_demo", "tools")
ANCHOR = re.compile(r'\bid="([\w.]+)"')


def public_modules() -> list[str]:
    """``luong_attention`` and its public submodules, by name."""
    package = importlib.import_module(PACKAGE)
    return [PACKAGE] + [
        f"{PACKAGE}.{info.name}"
        for info in pkgutil.iter_modules(package.__path__)
        if not info.name.startswith("_") and info.name not in NOT_API
    ]


def public_names() -> list[str]:
    """Every module of :func:`public_modules` and the full path of each name in its ``__all__``."""
    os.environ.setdefault("KERAS_BACKEND", "jax")  # a submodule may import Keras
    names = []
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        names.append(module_name)
        names += [f"{module_name}.{name}" for name in module.__all__]
    return names


def on_post_build(config: Any, **_: Any) -> None:
    """Raises ``PluginError`` naming every public name without an anchor under ``api/``."""
    anchors: set[str] = set()
    for page in Path(config["site_dir"], "api").rglob("*.html"):
        anchors.update(ANCHOR.findall(page.read_text(encoding="utf-8")))
    missing = [name for name in public_names() if name not in anchors]
    if missing:
        raise PluginError(
            "public names without a docstring or without an entry on an API page "
            f"(docs/api/): {', '.join(missing)}"
        )
