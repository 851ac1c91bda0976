"""Luong's scores, global and local attention vs NumPy formulas and loops; errors."""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported (the E1 reference test)

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.luong_utils import random_variables

from luong_attention import luong

B, TQ, TV, DQ, DM, U = 2, 3, 7, 4, 5, 6  # all distinct
LENGTHS = np.array([7, 4])


def _rand(seed, *shape):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32)


Q, M = _rand(0, B, TQ, DQ), _rand(1, B, TV, DM)
M_DOT = _rand(2, B, TV, DQ)  # memory with the query's depth, for "dot"
MASK = np.arange(TV) < LENGTHS[:, None]
PARAMS = {
    "general": {"w_a": _rand(3, DM, DQ)},
    "concat": {"w_a": _rand(4, DQ + DM, U), "v_a": _rand(5, U)},
    "location": {"w_a": _rand(6, DQ, TV + 2)},
}
LOCAL_P = {"w_p": _rand(7, DQ, U), "v_p": _rand(8, U)}


def _np_scores(score, q, m, params):
    """The paper's formulas, one (t, s) pair at a time for concat."""
    q, m = q.astype(np.float64), m.astype(np.float64)
    if score == "dot":
        return np.einsum("bqd,bvd->bqv", q, m)
    if score == "general":
        return np.einsum("bqd,bvm,md->bqv", q, m, params["w_a"])
    if score == "location":
        return np.einsum("bqd,dv->bqv", q, params["w_a"])[..., : m.shape[1]]
    out = np.zeros((q.shape[0], q.shape[1], m.shape[1]))
    for b in range(q.shape[0]):
        for t in range(q.shape[1]):
            for s in range(m.shape[1]):
                joined = np.concatenate([q[b, t], m[b, s]])
                out[b, t, s] = params["v_a"] @ np.tanh(params["w_a"].T @ joined)
    return out


def _np_softmax_in(scores, keep):
    """Softmax over the kept entries only; zero elsewhere."""
    z = np.where(keep, scores, -np.inf)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _memory_for(score):
    return M_DOT if score == "dot" else M


@pytest.mark.parametrize("score", ["dot", "general", "concat", "location"])
def test_scores_match_numpy(score):
    m = _memory_for(score)
    got = luong.luong_scores(jnp.asarray(Q), jnp.asarray(m), score=score, **PARAMS.get(score, {}))
    assert got.shape == (B, TQ, TV) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _np_scores(score, Q, m, PARAMS.get(score)), atol=1e-5)


@pytest.mark.parametrize("score", ["dot", "general"])
def test_scale_multiplies_scores(score):
    m = jnp.asarray(_memory_for(score))
    base = luong.luong_scores(jnp.asarray(Q), m, score=score, **PARAMS.get(score, {}))
    scaled = luong.luong_scores(jnp.asarray(Q), m, score=score, scale=0.5, **PARAMS.get(score, {}))
    np.testing.assert_allclose(scaled, 0.5 * base, rtol=1e-6)


@pytest.mark.parametrize("score", ["dot", "general", "concat", "location"])
def test_global_attention_matches_numpy(score):
    m = _memory_for(score)
    context, alignment = luong.luong_attend(Q, m, MASK, score=score, **PARAMS.get(score, {}))
    weights = _np_softmax_in(_np_scores(score, Q, m, PARAMS.get(score)), MASK[:, None])
    np.testing.assert_allclose(alignment, weights, atol=1e-6)
    np.testing.assert_allclose(context, np.einsum("bqv,bvd->bqd", weights, m), atol=1e-5)
    assert np.all(np.asarray(alignment)[:, :, ~MASK[1]][1] == 0.0)


def _np_local(scores, mode, window, q=None, steps=None):
    """A loop over examples and steps: the window, softmax within, Gaussian (local-p)."""
    weights = np.zeros_like(scores)
    for b in range(B):
        length = LENGTHS[b]
        for t in range(scores.shape[1]):
            if mode == "local-m":
                centre = min(t if steps is None else steps[b, t], length - 1)
            else:
                h = np.tanh(q[b, t].astype(np.float64) @ LOCAL_P["w_p"])
                centre = length / (1.0 + np.exp(-(h @ LOCAL_P["v_p"])))
            inside = [s for s in range(length) if abs(s - centre) <= window]
            z = scores[b, t, inside]
            a = np.exp(z - z.max())
            a /= a.sum()
            if mode == "local-p":
                sigma = window / 2.0
                a *= np.exp(-((np.array(inside) - centre) ** 2) / (2 * sigma**2))
            weights[b, t, inside] = a
    return weights


@pytest.mark.parametrize("score", ["general", "concat"])
@pytest.mark.parametrize(("mode", "window"), [("local-m", 0), ("local-m", 2), ("local-p", 1)])
def test_local_attention_matches_numpy_loop(score, mode, window):
    extra = LOCAL_P if mode == "local-p" else {}
    context, alignment = luong.luong_attend(
        Q, M, MASK, score=score, mode=mode, window=window, **PARAMS[score], **extra
    )
    expected = _np_local(_np_scores(score, Q, M, PARAMS[score]), mode, window, q=Q)
    np.testing.assert_allclose(alignment, expected, atol=1e-6)
    np.testing.assert_allclose(context, np.einsum("bqv,bvd->bqd", expected, M), atol=1e-5)


def test_general_global_equals_keras_attention_on_projected_keys():
    """Pitfall E1: "general" is Keras ``Attention()([h_t, h_s, h_s @ W_a])``."""
    import keras  # dev dependency: a missing keras fails, it does not skip

    w_a = PARAMS["general"]["w_a"]
    layer = keras.layers.Attention()
    out, weights = layer([Q, M, M @ w_a], mask=[None, MASK], return_attention_scores=True)
    context, alignment = luong.luong_attend(Q, M, MASK, score="general", w_a=w_a)
    np.testing.assert_allclose(alignment, np.asarray(weights), atol=1e-6)
    np.testing.assert_allclose(context, np.asarray(out), atol=1e-5)


def test_local_m_positions_and_target_longer_than_source():
    """Explicit steps; steps past the source end clip to its last position."""
    steps = np.array([[0, 5, 9], [2, 3, 8]])
    _, alignment = luong.luong_attend(
        Q, M, MASK, score="general", mode="local-m", window=1, positions=steps, **PARAMS["general"]
    )
    scores = _np_scores("general", Q, M, PARAMS["general"])
    np.testing.assert_allclose(alignment, _np_local(scores, "local-m", 1, steps=steps), atol=1e-6)
    assert float(alignment[1, 2, 3]) > 0.0 and float(alignment[1, 2, 2]) > 0.0


def test_local_p_is_not_renormalised_and_has_gradients():
    def run(w_p):
        return luong.luong_attend(
            Q,
            M,
            MASK,
            score="general",
            mode="local-p",
            window=2,
            w_p=w_p,
            v_p=LOCAL_P["v_p"],
            **PARAMS["general"],
        )

    _, alignment = run(LOCAL_P["w_p"])
    assert np.all(np.asarray(alignment.sum(-1)) < 1.0)
    grad = jax.grad(lambda w: jnp.sum(run(w)[0] ** 2))(jnp.asarray(LOCAL_P["w_p"]))
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).sum()) > 0.0


def test_window_and_gaussian_helpers():
    centres = jnp.array([[1.5, 0.0]])
    np.testing.assert_array_equal(
        luong.window_mask(centres, 5, 1),
        [[[False, True, True, False, False], [True, True, False, False, False]]],
    )
    g = luong.gaussian_weights(centres, 5, 2)  # sigma = 1
    np.testing.assert_allclose(g[0, 0], np.exp(-((np.arange(5) - 1.5) ** 2) / 2), rtol=1e-6)


def test_source_lengths_equal_the_boolean_mask():
    for mode, window, extra in [("global", None, {}), ("local-p", 2, LOCAL_P)]:
        kw = dict(score="general", mode=mode, window=window, **PARAMS["general"], **extra)
        by_mask = luong.luong_attend(Q, M, MASK, **kw)
        by_lengths = luong.luong_attend(Q, M, source_lengths=LENGTHS, **kw)
        for a, b in zip(by_mask, by_lengths, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-7)


@pytest.mark.parametrize(("mode", "window"), [("local-m", 1), ("local-p", 2)])
def test_fully_masked_example_stays_finite(mode, window):
    mask = MASK.copy()
    mask[1] = False
    kw = dict(score="general", mode=mode, window=window, **PARAMS["general"], **LOCAL_P)
    if mode == "local-m":
        kw = {k: v for k, v in kw.items() if k not in LOCAL_P}

    def loss(q, m):
        context, alignment = luong.luong_attend(q, m, mask, **kw)
        return jnp.sum(context**2) + jnp.sum(alignment)

    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(Q), jnp.asarray(M))
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_padding_garbage_does_not_leak():
    noisy = np.where(MASK[..., None], M, 1e4).astype(np.float32)
    kw = dict(score="concat", mode="local-p", window=2, **PARAMS["concat"], **LOCAL_P)
    clean = luong.luong_attend(Q, M, MASK, **kw)
    dirty = luong.luong_attend(Q, noisy, MASK, **kw)
    for a, b in zip(clean, dirty, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_jit_vmap_and_extra_batch_dims():
    kw = dict(score="general", mode="local-m", window=1, **PARAMS["general"])
    context, alignment = luong.luong_attend(Q, M, MASK, **kw)
    jitted = jax.jit(lambda q, m, mask: luong.luong_attend(q, m, mask, **kw))
    np.testing.assert_allclose(jitted(Q, M, MASK)[0], context, atol=1e-6)
    per_example = jax.vmap(lambda q, m, mask: luong.luong_attend(q, m, mask, **kw))(Q, M, MASK)
    np.testing.assert_allclose(per_example[1], alignment, atol=1e-7)
    nested = luong.luong_attend(Q[None], M[None], MASK[None], **kw)
    np.testing.assert_allclose(nested[1][0], alignment, atol=1e-7)


def test_bfloat16_inputs():
    q, m = jnp.asarray(Q, jnp.bfloat16), jnp.asarray(M, jnp.bfloat16)
    kw = dict(score="general", mode="local-p", window=2, **PARAMS["general"], **LOCAL_P)
    context, alignment = luong.luong_attend(q, m, MASK, **kw)
    assert context.dtype == alignment.dtype == jnp.bfloat16
    ref = luong.luong_attend(q.astype(jnp.float32), m.astype(jnp.float32), MASK, **kw)
    np.testing.assert_allclose(np.asarray(context, np.float32), ref[0], atol=5e-2)


def test_attentional_hidden_state():
    c, h, w_c = _rand(9, B, DM), _rand(10, B, DQ), _rand(11, DM + DQ, U)
    expected = np.tanh(np.concatenate([c, h], -1) @ w_c)
    np.testing.assert_allclose(luong.attentional_hidden_state(c, h, w_c), expected, atol=1e-6)


# -- the module ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "shapes"),
    [
        (dict(score="dot", use_scale=True), {"scale": ()}),
        (dict(score="general"), {"w_a": (DM, DQ)}),
        (dict(score="concat", units=U), {"w_a": (DQ + DM, U), "v_a": (U,)}),
        (dict(score="location", max_length=9), {"w_a": (DQ, 9)}),
        (
            dict(score="general", mode="local-p", window=1, units=U),
            {"w_a": (DM, DQ), "w_p": (DQ, U), "v_p": (U,)},
        ),
    ],
)
def test_module_params_and_equivalence_to_the_pure_function(config, shapes):
    attn = luong.LuongAttention(**config)
    m = M_DOT if config["score"] == "dot" else M
    variables = random_variables(attn.init, jax.random.key(0), Q, m, MASK)
    params = variables["params"]
    assert jax.tree.map(jnp.shape, dict(params)) == shapes
    got = attn.apply(variables, Q, m, MASK)
    kw = {k: v for k, v in config.items() if k in ("score", "mode", "window")}
    expected = luong.luong_attend(Q, m, MASK, **kw, **params)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7)


def test_module_initial_values():
    attn = luong.LuongAttention(score="general", use_scale=True)
    params = attn.init(jax.random.key(0), Q, M)["params"]
    assert float(params["scale"]) == 1.0
    assert 0.1 < float(jnp.std(params["w_a"])) < 1.0  # lecun_normal: std ~ 1/sqrt(DM)


@pytest.mark.parametrize(
    "config",
    [
        dict(score="general", mode="local-m", window=1),
        dict(score="concat", mode="local-p", window=2),
        dict(score="location", max_length=TV),
    ],
)
def test_module_single_step_equals_sequence(config):
    attn = luong.LuongAttention(**config)
    variables = random_variables(attn.init, jax.random.key(0), Q, M, MASK)
    context, alignment = attn.apply(variables, Q, M, MASK)
    for t in range(TQ):
        c_t, a_t = attn.apply(variables, Q[:, t], M, MASK, positions=jnp.full((B,), t))
        np.testing.assert_allclose(c_t, context[:, t], atol=1e-6)
        np.testing.assert_allclose(a_t, alignment[:, t], atol=1e-7)


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(score="bahdanau"), "score must be one of"),
        (dict(mode="local"), "mode must be one of"),
        (dict(window=2), "needs mode='local-m' or mode='local-p'"),
        (dict(mode="local-m"), r"needs an integer window \(half-width D\) >= 0"),
        (dict(mode="local-m", window=-1), "Received: window=-1"),
        (dict(mode="local-m", window=1.5), "Received: window=1.5"),
        (dict(mode="local-p", window=0), "local-p' needs an integer window .* >= 1"),
        (dict(score="location"), "needs max_length"),
        (dict(score="general", max_length=5), "max_length is only used with score='location'"),
        (dict(score="concat", use_scale=True), "use_scale applies to"),
    ],
)
def test_bad_configuration_raises_at_construction(config, message):
    with pytest.raises(ValueError, match=message):
        luong.LuongAttention(**config)


def test_bad_inputs_raise():
    general = PARAMS["general"]
    w_a = general["w_a"]
    attn = luong.LuongAttention(score="location", max_length=TV - 1)
    with pytest.raises(ValueError, match="at most max_length=6 source positions"):
        jax.eval_shape(attn.init, jax.random.key(0), Q, M)
    with pytest.raises(ValueError, match="score='dot' needs query and memory of the same depth"):
        jax.eval_shape(luong.LuongAttention(score="dot").init, jax.random.key(0), Q, M)
    with pytest.raises(ValueError, match="query must be"):
        jax.eval_shape(luong.LuongAttention().init, jax.random.key(0), Q[None, None], M)
    with pytest.raises(ValueError, match=r"memory_mask must have shape \[batch..., Tv\]"):
        jax.eval_shape(luong.LuongAttention().init, jax.random.key(0), Q, M, MASK[:, :TQ])
    with pytest.raises(ValueError, match="needs its decoder step"):
        local_m = luong.LuongAttention(mode="local-m", window=1)
        jax.eval_shape(local_m.init, jax.random.key(0), Q[:, 0], M)
    with pytest.raises(ValueError, match=r"needs w_a of shape \(5, 4\)"):
        luong.luong_attend(Q, M, score="general")
    with pytest.raises(ValueError, match=r"needs v_a of shape \(6,\)"):
        luong.luong_attend(Q, M, score="concat", w_a=PARAMS["concat"]["w_a"], v_a=np.ones(3))
    with pytest.raises(ValueError, match="needs w_p"):
        luong.luong_attend(Q, M, score="general", mode="local-p", window=1, **PARAMS["general"])
    with pytest.raises(ValueError, match=r"source_lengths must be integers of shape \[batch...\]"):
        luong.luong_attend(Q, M, source_lengths=np.array([1, 2, 3]), score="general", w_a=w_a)
    with pytest.raises(ValueError, match=r"positions must be integers of shape \[batch..., Tq\]"):
        luong.luong_attend(Q, M, mode="local-m", window=1, positions=np.arange(5), **general)
    with pytest.raises(TypeError, match="floating-point"):
        luong.luong_attend(Q.astype(np.int32), M, score="general", **PARAMS["general"])
