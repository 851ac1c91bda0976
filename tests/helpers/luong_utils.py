"""Helpers shared by the tests/library/functional/test_luong_*.py files."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(init_fn: Callable[..., Any], *args: Any, seed: int = 0, **kwargs: Any) -> Any:
    """Variables shaped as ``init_fn(*args, **kwargs)`` makes them, drawn with NumPy.

    ``jax.eval_shape`` gives the tree without compiling Flax's initialisers (compiling the
    PRNG ops dominated the tests' run time); entries are ``0.4 * N(0, 1)``.
    """
    shapes = jax.eval_shape(init_fn, *args, **kwargs)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.4 * rng.standard_normal(s.shape), s.dtype), shapes)
