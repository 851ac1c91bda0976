"""``implementation=``: the automatic rule, explicit choices, and the module's pass-through."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from luong_attention import Attention, attention, select_implementation
from luong_attention._src.functional import attention as core
from luong_attention.keras_compat import keras_config


def _arrays(batch, tq, tv, dim, dim_v=3):
    return (
        jax.ShapeDtypeStruct((*batch, tq, dim), jnp.float32),
        jax.ShapeDtypeStruct((*batch, tv, dim), jnp.float32),
        jax.ShapeDtypeStruct((*batch, tv, dim_v), jnp.float32),
    )


def _uses_blocked(fn, *args) -> bool:
    """Whether the traced computation contains the blocked kernel (a custom_jvp call)."""
    return "custom_jvp_call" in str(jax.make_jaxpr(fn)(*args))


def test_rule_dot_counts_both_lengths_per_example():
    limit = core.AUTO_BLOCKED_DOT_SCORES
    assert select_implementation("dot", *_arrays((), 1024, limit // 1024, 8)) == "blocked"
    assert select_implementation("dot", *_arrays((), 1024, limit // 1024 - 1, 8)) == "xla"
    # A batch does not make short rows blocked (the dense gradient is faster there) ...
    assert select_implementation("dot", *_arrays((2, 8), 256, 256, 8)) == "xla"
    # ... a long row is blocked whatever the batch.
    assert select_implementation("dot", *_arrays((3, 5), 2048, 512, 8)) == "blocked"


def test_rule_dot_counts_the_whole_batch_for_memory():
    limit = core.AUTO_BLOCKED_DOT_BATCH_SCORES
    per_example = 256 * 256
    assert per_example < core.AUTO_BLOCKED_DOT_SCORES
    batch = limit // per_example
    assert select_implementation("dot", *_arrays((4, batch // 4), 256, 256, 8)) == "blocked"
    assert select_implementation("dot", *_arrays((batch - 1,), 256, 256, 8)) == "xla"


def test_rule_concat_counts_depth():
    limit = core.AUTO_BLOCKED_CONCAT_ELEMENTS
    tq = 64
    tv = limit // (tq * 16)
    assert select_implementation("concat", *_arrays((), tq, tv, 16)) == "blocked"
    assert select_implementation("concat", *_arrays((), tq, tv - 1, 16)) == "xla"
    # The same shape in "dot" mode is far below the dot threshold.
    assert select_implementation("dot", *_arrays((), tq, tv, 16)) == "xla"


def test_rule_prefers_dense_when_weights_are_returned():
    big = _arrays((), 4096, 4096, 8)
    assert select_implementation("dot", *big) == "blocked"
    assert select_implementation("dot", *big, return_attention_scores=True) == "xla"


def test_attention_follows_the_rule_and_explicit_choice():
    small = [jnp.ones(s.shape) for s in _arrays((2,), 5, 7, 4)]
    q, k, v = small
    assert not _uses_blocked(lambda q, k, v: attention(q, v, k), q, k, v)
    assert _uses_blocked(lambda q, k, v: attention(q, v, k, implementation="blocked"), q, k, v)
    big = _arrays((), 2048, 1024, 4)
    assert _uses_blocked(lambda q, k, v: attention(q, v, k), *big)
    assert not _uses_blocked(lambda q, k, v: attention(q, v, k, implementation="xla"), *big)


@pytest.mark.parametrize("bad", ["flash", "XLA", 1])
def test_bad_implementation_is_rejected(bad):
    q = jnp.ones((2, 5, 4))
    with pytest.raises(ValueError, match="implementation"):
        attention(q, q, implementation=bad)
    with pytest.raises(ValueError, match="implementation"):
        Attention(implementation=bad)


def test_module_passes_implementation_through():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 9, 4)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 11, 3)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 11, 4)), jnp.float32)
    value_mask = jnp.arange(11)[None, :] < jnp.array([[11], [6]])
    outs = {}
    for impl in ("xla", "blocked"):
        layer = Attention(use_scale=True, score_mode="concat", implementation=impl)
        variables = layer.init(jax.random.key(0), [q, v, k])

        def apply(q, v, k, layer=layer, variables=variables):
            return layer.apply(variables, [q, v, k], mask=[None, value_mask], use_causal_mask=True)

        assert _uses_blocked(apply, q, v, k) == (impl == "blocked")
        outs[impl] = apply(q, v, k)
    np.testing.assert_allclose(outs["blocked"], outs["xla"], atol=2e-6, rtol=1e-5)
    # The Keras config does not carry the implementation.
    assert "implementation" not in keras_config(Attention(implementation="blocked"))
