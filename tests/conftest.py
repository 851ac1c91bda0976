"""Pytest set-up: Keras (the reference) runs on the JAX backend."""

from __future__ import annotations

import os

# Keras picks its backend at import time: set it before anything can import keras.
os.environ["KERAS_BACKEND"] = "jax"

import pytest


@pytest.fixture(scope="session")
def keras():
    """Keras 3 on the JAX backend (the reference; a dev dependency, never skipped)."""
    import keras as keras_module

    assert keras_module.backend.backend() == "jax"
    return keras_module
