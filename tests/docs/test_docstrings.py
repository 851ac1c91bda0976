"""Every docstring example in the package runs and prints what it shows (doctest)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import types

import pytest

import luong_attention

PUBLIC_NAMESPACES = ("luong", "decoding", "nnx", "keras_compat", "keras")
MODULES = sorted(
    info.name for info in pkgutil.walk_packages(luong_attention.__path__, prefix="luong_attention.")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(
        importlib.import_module(name), verbose=False, optionflags=doctest.NORMALIZE_WHITESPACE
    )
    assert result.failed == 0


PUBLIC = ["luong_attention", *(f"luong_attention.{n}" for n in PUBLIC_NAMESPACES)]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_names_are_documented(name):
    """``__all__`` lists exactly the module's public names; each has a docstring, each module
    class an example."""
    module = importlib.import_module(name)
    own = {
        n
        for n, obj in vars(module).items()
        if not n.startswith("_") and not isinstance(obj, types.ModuleType) and n != "annotations"
    }
    assert set(module.__all__) == own
    for public in module.__all__:
        obj = getattr(module, public)
        if isinstance(obj, (str, tuple, float, int)):
            continue  # constants are documented in the module docstring
        assert obj.__doc__ and obj.__doc__.strip(), f"{name}.{public} has no docstring"
        if isinstance(obj, type) and callable(obj) and not _is_namedtuple(obj):
            assert ">>>" in obj.__doc__, f"{name}.{public} has no example"


def _is_namedtuple(cls: type) -> bool:
    return issubclass(cls, tuple)
