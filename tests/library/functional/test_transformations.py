"""Every JAX transformation on every path (issue 19): forward mode and higher orders.

``jax.jvp``, ``jax.linearize``, ``jacfwd``/``jacrev``, both Hessian-vector-product orders,
``grad(grad)``, ``jax.hessian``, ``vmap`` of ``jvp``, ``jax.checkpoint`` and ``lax.scan``
around :func:`luong_attention.attention`, on the ``"xla"``, ``"blocked"`` and ``"pallas"``
(the GPU kernel, interpreted) paths, against autodiff of an independent dense float64
formula of Keras's attention (:func:`_dense64`, itself checked against the NumPy loop of
``helpers.reference``), plus ``check_grads`` (order 2, both modes) in float64.

Tiles are forced small (:func:`small_tiles`: 4 x 4 blocked tiles, 16-row Pallas tiles), so
that at these odd lengths (``B, Tq, Tv, depth, dim_v`` all distinct) the kernels run several
tiles, padded rows and keys, and skipped causal tiles. The masked case hides the first key
of example 0 under the causal mask, so its row 0 sees no key at all (Keras's near-uniform
row), and masks some queries.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.reference import reference_attention

import luong_attention as la
from luong_attention._src.kernels import blocked, pallas_gpu
from luong_attention._src.kernels.registry import get_kernel

# (B, Tq, Tv, depth, dim_v): all distinct, none a multiple of the tiles.
B, TQ, TV, DIM, DIM_V = 2, 13, 11, 5, 3
# The Pallas kernel is interpreted on this CPU: a little over one 16-row tile each way.
PALLAS_SHAPE = (2, 19, 17, 5, 3)
# Hessians: a few dozen entries per argument.
SMALL_SHAPE = (2, 5, 4, 3, 2)
BLOCK = 4
SCALE, WEIGHT, RATE = 0.7, 1.3, 0.3
IMPLEMENTATIONS = ("xla", "blocked", "pallas")


def _implementations(default, implementations=IMPLEMENTATIONS):
    """``implementation`` params; those not in ``default`` run with ``pytest -m slow``."""
    return [
        pytest.param(impl, id=impl, marks=() if impl in default else (pytest.mark.slow,))
        for impl in implementations
    ]


# Tolerances of float32 results against float64: (atol, rtol), scaled by the reference's size.
F32 = 2e-5
BF16 = 3e-2


@pytest.fixture
def small_tiles(monkeypatch):
    """4 x 4 blocked tiles and 16-row Pallas tiles (the smallest Triton takes)."""
    monkeypatch.setattr(blocked, "default_blocks", lambda *args, **kwargs: (BLOCK, BLOCK))
    monkeypatch.setattr(pallas_gpu, "DEFAULT_BLOCK", 16)


pytestmark = pytest.mark.usefixtures("small_tiles")


def test_small_tiles_split_the_problem(small_tiles):
    """The fixture works: both kernels run several query and key tiles at these lengths."""
    cfg = get_kernel("blocked").config("dot", TQ, TV, DIM, batch=B)
    assert (cfg.n_q, cfg.n_kv) == (4, 3)
    _, tq, tv, dim, _ = PALLAS_SHAPE
    cfg = get_kernel("pallas_gpu_interpret").config("dot", tq, tv, dim, batch=B)
    assert (cfg.n_q, cfg.n_kv) == (2, 2)


# ----------------------------------------------------------------------------- inputs


def _shape(implementation):
    return PALLAS_SHAPE if implementation == "pallas" else (B, TQ, TV, DIM, DIM_V)


def _inputs(shape, seed=0, dtype=jnp.float32):
    """``(q, k, v)`` from N(0, 1) in ``dtype``."""
    b, tq, tv, dim, dim_v = shape
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=s) for s in ((b, tq, dim), (b, tv, dim), (b, tv, dim_v)))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _tangents(args, seed=100):
    """Random tangents shaped (and typed) as ``args``."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=np.shape(x)), jnp.asarray(x).dtype) for x in args)


def _masks(shape, masked, full_row=True):
    """``(query_mask, value_mask, causal)``: none, or random masks with some queries masked
    and (``full_row``) example 0's first key hidden: with causal, its row 0 sees nothing."""
    if not masked:
        return None, None, False
    b, tq, tv, _, _ = shape
    rng = np.random.default_rng(7)
    value_mask = rng.random((b, tv)) < 0.7
    value_mask[:, 1] = True
    value_mask[0, 0] = not full_row
    query_mask = rng.random((b, tq)) < 0.8
    query_mask[:, 0] = True  # keep the fully masked row's output
    return query_mask, value_mask, True


# ------------------------------------------------------------------- the functions


def _attention(implementation, mode, masks, *, dropout_rng=None, matmul_dtype=None):
    """``(q, k, v, scale, weight) -> out`` through :func:`la.attention`."""
    query_mask, value_mask, causal = masks

    def fn(q, k, v, scale=SCALE, weight=WEIGHT):
        return la.attention(
            q,
            v,
            k,
            query_mask=query_mask,
            value_mask=value_mask,
            use_causal_mask=causal,
            score_mode=mode,
            scale=scale,
            concat_score_weight=weight if mode == "concat" else None,
            dropout_rate=RATE if dropout_rng is not None else 0.0,
            dropout_rng=dropout_rng,
            implementation=implementation,
            matmul_dtype=matmul_dtype,
        )

    return fn


def _dense64(mode, masks, mult=None):
    """Keras's attention written out densely for float64 autodiff: ``(q, k, v, scale,
    weight) -> out``. Hidden keys get ``score - 1e9`` computed in float32 as Keras does (a
    fully masked row is Keras's near-uniform one); ``mult`` multiplies the weights (a
    dropout mask)."""
    query_mask, value_mask, causal = masks

    def fn(q, k, v, scale=SCALE, weight=WEIGHT):
        if mode == "dot":
            s = scale * jnp.einsum("bqd,bkd->bqk", q, k)
        else:
            s = weight * jnp.tanh(scale * (q[:, :, None, :] + k[:, None, :, :])).sum(-1)
        tq, tv = s.shape[-2:]
        allowed = jnp.ones(s.shape, bool)
        if causal:
            allowed &= jnp.arange(tv)[None, :] <= jnp.arange(tq)[:, None]
        if value_mask is not None:
            allowed &= jnp.asarray(value_mask)[:, None, :]
        penalised = (s.astype(jnp.float32) - 1e9).astype(s.dtype)
        w = jax.nn.softmax(jnp.where(allowed, s, penalised), axis=-1)
        if mult is not None:
            w = w * mult
        out = jnp.einsum("bqk,bkv->bqv", w, v)
        if query_mask is not None:
            out = jnp.where(jnp.asarray(query_mask)[..., None], out, 0.0)
        return out

    return fn


def _f64(tree):
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)), tree)


def _reference(transform, fn, *args):
    """``transform(fn)(*args)`` in float64 (x64 on for the call only), as NumPy."""
    with jax.enable_x64(True):
        out = jax.jit(transform(fn))(*_f64(args))
        return jax.tree.map(np.asarray, out)


def _close(got, want, tol=F32, label=""):
    """``|got - want| <= tol * (1 + |want|)`` per leaf (both pytrees), no NaN in ``got``."""
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves), label
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        g = np.asarray(g, np.float64)
        assert np.isfinite(g).all(), f"{label}[{i}]: not finite"
        scale = 1.0 + np.abs(w).max()
        np.testing.assert_allclose(g, w, atol=tol * scale, rtol=tol, err_msg=f"{label}[{i}]")


def _cotangent(shape, dtype=jnp.float32):
    return jnp.cos(jnp.arange(np.prod(shape)).reshape(shape)).astype(dtype)


def _loss(fn):
    """A scalar loss of ``fn``'s output: every output entry weighed differently."""

    def loss(*args):
        out = fn(*args)
        return (out * _cotangent(out.shape, out.dtype)).sum()

    return loss


def _jvp(fn, n_args):
    """``(primals..., tangents...) -> (out, d_out)`` of ``fn``'s first ``n_args`` args."""

    def run(*args):
        return jax.jvp(fn, args[:n_args], args[n_args:])

    return run


def _hvp(loss):
    """``(q, k, v, dq, dk, dv) -> H (dq, dk, dv)``, forward over reverse."""
    return lambda *a: jax.jvp(jax.grad(loss, (0, 1, 2)), a[:3], a[3:])[1]


# ------------------------------------------------------------ the reference itself


@pytest.mark.parametrize(
    ("mode", "masked"),
    [
        pytest.param("dot", False, id="dot-plain", marks=pytest.mark.slow),
        pytest.param("concat", False, id="concat-plain", marks=pytest.mark.slow),
        pytest.param("dot", True, id="dot-masked"),
        pytest.param("concat", True, id="concat-masked"),
    ],
)
def test_dense64_is_keras_attention(mode, masked):
    """The float64 formula this file trusts equals the NumPy loop of ``helpers.reference``."""
    shape = (B, TQ, TV, DIM, DIM_V)
    masks = _masks(shape, masked)
    q, k, v = _inputs(shape)
    got = _reference(lambda f: f, _dense64(mode, masks), q, k, v)
    query_mask, value_mask, causal = masks
    want, _ = reference_attention(
        q,
        v,
        k,
        query_mask=query_mask,
        value_mask=value_mask,
        causal=causal,
        score_mode=mode,
        scale=SCALE,
        concat_score_weight=WEIGHT if mode == "concat" else None,
    )
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------- forward mode


def _forward_cases(default):
    """``(implementation, mode, masked)`` params, Pallas "dot" only (all it computes); those
    not in ``default`` (ids) run with ``pytest -m slow``."""
    cases = []
    for impl in IMPLEMENTATIONS:
        for mode in ("dot", "concat"):
            for masked in (False, True):
                if impl == "pallas" and mode == "concat":
                    continue
                case_id = f"{impl}-{mode}-{'masked' if masked else 'plain'}"
                marks = () if case_id in default else (pytest.mark.slow,)
                cases.append(pytest.param(impl, mode, masked, id=case_id, marks=marks))
    return cases


@pytest.mark.parametrize(
    ("implementation", "mode", "masked"),
    _forward_cases(
        {"xla-concat-masked", "blocked-dot-masked", "blocked-concat-masked", "pallas-dot-masked"}
    ),
)
def test_jvp_in_every_input_matches_float64(implementation, mode, masked):
    """``jax.jvp`` in q, k, v, scale and the concat weight at once (traced scalars)."""
    shape = _shape(implementation)
    masks = _masks(shape, masked)
    args = (*_inputs(shape), jnp.float32(SCALE), jnp.float32(WEIGHT))
    tangents = _tangents(args)
    run = _jvp(_attention(implementation, mode, masks), 5)
    got = jax.jit(run)(*args, *tangents)
    want = _reference(lambda f: _jvp(f, 5), _dense64(mode, masks), *args, *tangents)
    _close(got, want, label="(out, d_out)")


SCALAR_CASES = [
    pytest.param(
        impl,
        mode,
        which,
        id=f"{impl}-{mode}-{which}",
        marks=() if impl == "blocked" and mode == "concat" else (pytest.mark.slow,),
    )
    for impl in IMPLEMENTATIONS
    for mode, which in (("dot", "scale"), ("concat", "scale"), ("concat", "weight"))
    if not (impl == "pallas" and mode == "concat")
]


@pytest.mark.parametrize(("implementation", "mode", "which"), SCALAR_CASES)
def test_tangent_of_scale_and_concat_weight_alone(implementation, mode, which):
    """The push-forward of one traced scalar alone (q, k, v held): ``d out / d scale`` and
    ``d out / d concat_score_weight``."""
    shape = _shape(implementation)
    masks = _masks(shape, True)
    q, k, v = _inputs(shape, seed=1)
    index = {"scale": 0, "weight": 1}[which]

    def of_scalar(fn):
        def run(scalar):
            scalars = [SCALE, WEIGHT]
            scalars[index] = scalar
            return fn(q, k, v, *scalars)

        return lambda s: jax.jvp(run, (s,), (jnp.ones_like(s),))

    got = jax.jit(of_scalar(_attention(implementation, mode, masks)))(jnp.float32(0.9))
    with jax.enable_x64(True):
        q, k, v = _f64((q, k, v))
        want = jax.jit(of_scalar(_dense64(mode, masks)))(jnp.float64(0.9))
    _close(got, want, label=which)
    assert np.abs(np.asarray(got[1])).max() > 1e-3  # a tangent that can be wrong


@pytest.mark.parametrize("implementation", _implementations(("xla",), ("xla", "blocked")))
def test_linearize_called_twice(implementation):
    """``jax.linearize``: one linearisation, two tangents, each the float64 jvp."""
    shape = _shape(implementation)
    masks = _masks(shape, True)
    fn = _attention(implementation, "dot", masks)
    args = _inputs(shape, seed=2)
    out, f_lin = jax.linearize(fn, *args)
    first, second = _tangents(args, seed=3), _tangents(args, seed=4)
    got = (out, f_lin(*first), f_lin(*second))
    ref = _dense64("dot", masks)
    want = tuple(_reference(lambda f: _jvp(f, 3), ref, *args, *t)[1] for t in (first, second))
    _close(got[0], _reference(lambda f: f, ref, *args), label="out")
    _close(got[1:], want, label="tangents")
    assert np.abs(np.asarray(got[1]) - np.asarray(got[2])).max() > 1e-2


@pytest.mark.parametrize("implementation", _implementations(("blocked",), IMPLEMENTATIONS))
def test_vmap_of_jvp(implementation):
    """``vmap`` over a stack of tangents, and over a stack of primals with their tangents."""
    shape = _shape(implementation)
    masks = _masks(shape, True)
    fn = _attention(implementation, "dot", masks)
    q, k, v = _inputs(shape, seed=5)
    tangent_stack = jnp.stack([_tangents((q,), seed=s)[0] for s in range(3)])
    primal_stack = jnp.stack([_inputs(shape, seed=10 + s)[0] for s in range(3)])

    def jvp_q(f, q, k, v, dq):
        return jax.jvp(lambda q: f(q, k, v), (q,), (dq,))[1]

    over_tangents = jax.vmap(jvp_q, (None, None, None, None, 0))
    over_primals = jax.vmap(jvp_q, (None, 0, None, None, 0))
    got = jax.jit(lambda *a: over_tangents(fn, *a))(q, k, v, tangent_stack)
    got_p = jax.jit(lambda *a: over_primals(fn, *a))(primal_stack, k, v, tangent_stack)
    ref = _dense64("dot", masks)
    want = _reference(lambda f: functools.partial(over_tangents, f), ref, q, k, v, tangent_stack)
    want_p = _reference(
        lambda f: functools.partial(over_primals, f), ref, primal_stack, k, v, tangent_stack
    )
    _close(got, want, label="over tangents")
    _close(got_p, want_p, label="over primals")


def test_vmap_of_jvp_and_grad_with_spmd_axis_name():
    """A ``vmap`` with ``spmd_axis_name`` (batch sharded over a mesh axis) around the
    blocked kernel's jvp and gradient (the linear primitive re-applies such a ``vmap``):
    the numbers are the float64 reference's."""
    shape = _shape("blocked")
    masks = _masks(shape, True)
    q, k, v = (jnp.stack([x, 0.5 * x]) for x in _inputs(shape, seed=5))
    dq = jnp.stack([_tangents((q[0],), seed=s)[0] for s in range(2)])

    def jvp_and_grad(f, q, k, v, dq):
        out = jax.jvp(lambda q: f(q, k, v), (q,), (dq,))[1]
        return out, jax.grad(lambda q: (f(q, k, v) * out).sum())(q)

    with jax.set_mesh(jax.make_mesh((1,), ("x",))):
        fn = functools.partial(jvp_and_grad, _attention("blocked", "dot", masks))
        got = jax.jit(jax.vmap(fn, spmd_axis_name="x"))(q, k, v, dq)
    want = _reference(
        lambda f: jax.vmap(functools.partial(jvp_and_grad, f)), _dense64("dot", masks), q, k, v, dq
    )
    _close(got, want, label="(jvp, grad)")


# ------------------------------------------------------------ second order, float32


@pytest.mark.parametrize(
    ("implementation", "mode", "masked"),
    _forward_cases({"xla-concat-masked", "blocked-dot-masked"}),
)
def test_hvp_both_orders_match_float64(implementation, mode, masked):
    """Hessian-vector products of a scalar loss in (q, k, v): forward-over-reverse
    ``jvp(grad(loss))`` and reverse-over-forward ``grad(jvp(loss)[1])``."""
    shape = _shape(implementation)
    masks = _masks(shape, masked)
    args = _inputs(shape, seed=3)
    tangents = _tangents(args, seed=6)

    def rev_over_fwd(loss):
        def run(*a):
            return jax.grad(lambda *x: jax.jvp(loss, x, a[3:])[1], (0, 1, 2))(*a[:3])

        return run

    loss = _loss(_attention(implementation, mode, masks))
    want = _reference(lambda f: _hvp(_loss(f)), _dense64(mode, masks), *args, *tangents)
    for order, transform in (("fwd_over_rev", _hvp), ("rev_over_fwd", rev_over_fwd)):
        got = jax.jit(transform(loss))(*args, *tangents)
        _close(got, want, tol=2e-4, label=order)


@pytest.mark.parametrize("implementation", _implementations(("blocked",), IMPLEMENTATIONS))
def test_grad_of_grad(implementation):
    """``grad`` of a weighted sum of the gradient (reverse over reverse)."""
    shape = _shape(implementation)
    masks = _masks(shape, True)
    args = _inputs(shape, seed=4)
    weights = _tangents(args, seed=7)

    def grad_of_grad(loss):
        def inner(*a):
            grads = jax.grad(loss, (0, 1, 2))(*a[:3])
            return sum((g * w).sum() for g, w in zip(grads, a[3:], strict=True))

        return lambda *a: jax.grad(inner, (0, 1, 2))(*a)

    loss = _loss(_attention(implementation, "dot", masks))
    got = jax.jit(grad_of_grad(loss))(*args, *weights)
    want = _reference(lambda f: grad_of_grad(_loss(f)), _dense64("dot", masks), *args, *weights)
    _close(got, want, tol=2e-4, label="grad(grad)")


@pytest.mark.parametrize(
    ("implementation", "mode"),
    [
        pytest.param("xla", "dot", id="xla-dot", marks=pytest.mark.slow),
        pytest.param("xla", "concat", id="xla-concat", marks=pytest.mark.slow),
        pytest.param("blocked", "dot", id="blocked-dot"),
        pytest.param("blocked", "concat", id="blocked-concat", marks=pytest.mark.slow),
    ],
)
def test_hessian_and_jacobians_small(implementation, mode):
    """``jax.hessian`` of the loss in (q, k, v), and ``jacfwd == jacrev`` of the output, at
    a tiny masked causal size (a fully masked row): finite, and equal to float64."""
    masks = _masks(SMALL_SHAPE, True)
    args = _inputs(SMALL_SHAPE, seed=8)
    fn = _attention(implementation, mode, masks)
    hessian = jax.jit(jax.hessian(_loss(fn), (0, 1, 2)))(*args)
    jac_fwd = jax.jit(jax.jacfwd(fn, (0, 1, 2)))(*args)
    jac_rev = jax.jit(jax.jacrev(fn, (0, 1, 2)))(*args)
    ref = _dense64(mode, masks)
    want_h = _reference(lambda f: jax.hessian(_loss(f), (0, 1, 2)), ref, *args)
    want_j = _reference(lambda f: jax.jacrev(f, (0, 1, 2)), ref, *args)
    _close(hessian, want_h, tol=2e-4, label="hessian")
    _close(jac_fwd, want_j, label="jacfwd")
    _close(jac_rev, want_j, label="jacrev")
    _close(jac_fwd, jax.tree.map(np.asarray, jac_rev), tol=1e-5, label="jacfwd vs jacrev")


@pytest.mark.slow
def test_pallas_hessian_small():
    """The Pallas kernel's Hessian in q (one tile, padded rows and keys)."""
    masks = _masks(SMALL_SHAPE, True)
    args = _inputs(SMALL_SHAPE, seed=9)
    fn = _attention("pallas", "dot", masks)
    got = jax.jit(jax.hessian(lambda q: _loss(fn)(q, *args[1:])))(args[0])
    want = _reference(
        lambda f: jax.hessian(lambda q, k, v: _loss(f)(q, k, v)), _dense64("dot", masks), *args
    )
    _close(got, want, tol=2e-4, label="hessian")


# ------------------------------------------------------- checkpoint and lax.scan


@pytest.mark.parametrize("implementation", _implementations(("blocked",), IMPLEMENTATIONS))
def test_checkpoint_under_jvp_and_grad(implementation):
    """``jax.checkpoint`` around the call: jvp and grad equal float64."""
    shape = _shape(implementation)
    masks = _masks(shape, True)
    args = _inputs(shape, seed=11)
    tangents = _tangents(args, seed=12)
    fn = jax.checkpoint(_attention(implementation, "dot", masks))
    got_jvp = jax.jit(lambda *a: jax.jvp(fn, a, tangents))(*args)
    got_grad = jax.jit(jax.grad(_loss(fn), (0, 1, 2)))(*args)
    ref = _dense64("dot", masks)
    want_grad = _reference(lambda f: jax.grad(_loss(f), (0, 1, 2)), ref, *args)
    want_jvp = _reference(lambda f: _jvp(f, 3), ref, *args, *tangents)
    _close(got_jvp, want_jvp, label="jvp")
    _close(got_grad, want_grad, label="grad")


def _scan_model(fn, steps=3):
    """``(q, k, v, proj) -> q'``: ``steps`` attention calls in a ``lax.scan``, each query the
    last plus its output projected back (``proj [dim_v, depth]``)."""

    def model(q, k, v, proj):
        def step(h, scale):
            out = fn(h, k, v, scale)
            return h + jnp.einsum("bqv,vd->bqd", out, proj), out.sum()

        h, _ = jax.lax.scan(step, q, jnp.linspace(0.5, 0.9, steps).astype(q.dtype))
        return h

    return model


@pytest.mark.parametrize("implementation", _implementations(("blocked",), IMPLEMENTATIONS))
def test_scan_of_attention_under_jvp_and_grad(implementation):
    shape = _shape(implementation)
    masks = _masks(shape, True)
    q, k, v = _inputs(shape, seed=13)
    proj = jnp.asarray(np.random.default_rng(14).normal(size=(shape[4], shape[3])), jnp.float32)
    args = (q, k, v, proj)
    tangents = _tangents(args, seed=15)
    model = _scan_model(_attention(implementation, "dot", masks))
    got_jvp = jax.jit(lambda *a: jax.jvp(model, a, tangents))(*args)
    got_grad = jax.jit(jax.grad(_loss(model), (0, 1, 2, 3)))(*args)
    ref = _scan_model(_dense64("dot", masks))
    want_jvp = _reference(lambda f: _jvp(f, 4), ref, *args, *tangents)
    want_grad = _reference(lambda f: jax.grad(_loss(f), (0, 1, 2, 3)), ref, *args)
    _close(got_jvp, want_jvp, tol=5e-5, label="jvp")
    _close(got_grad, want_grad, tol=5e-5, label="grad")


# --------------------------------------------------------------------------- dropout


def _dropout_multiplier(implementation, mode, shape, causal, rng):
    """The ``[B, Tq, Tv]`` dropout multipliers the call draws (the kernel's, at its tiles;
    the dense path's ``bernoulli`` over the weights' shape)."""
    b, tq, tv, dim, _ = shape
    if implementation == "xla":
        keep = jax.random.bernoulli(rng, 1.0 - RATE, (b, tq, tv))
        return np.where(keep, 1.0 / (1.0 - RATE), 0.0)
    name = {"blocked": "blocked", "pallas": "pallas_gpu_interpret"}[implementation]
    kernel = get_kernel(name)
    cfg = kernel.config(mode, tq, tv, dim, causal=causal, dropout_rate=RATE, batch=b)
    return np.asarray(kernel.dropout_multiplier(cfg, rng, b), np.float64)


@pytest.mark.parametrize("implementation", _implementations(("pallas",), IMPLEMENTATIONS))
def test_jvp_with_dropout_matches_float64_given_the_mask(implementation):
    """A fixed ``dropout_rng``: the output and its jvp (q, k, v, scale) equal the dense
    formula's with the call's own dropout multipliers."""
    shape = _shape(implementation)
    masks = _masks(shape, True)
    rng = jax.random.key(3)
    args = (*_inputs(shape, seed=16), jnp.float32(SCALE))
    tangents = _tangents(args, seed=17)
    fn = _attention(implementation, "dot", masks, dropout_rng=rng)
    got = jax.jit(_jvp(fn, 4))(*args, *tangents)
    mult = _dropout_multiplier(implementation, "dot", shape, True, rng)
    assert 0.1 < (mult == 0).mean() < 0.5
    want = _reference(lambda f: _jvp(f, 4), _dense64("dot", masks, mult), *args, *tangents)
    _close(got, want, label="(out, d_out)")


@pytest.mark.parametrize("implementation", _implementations((), IMPLEMENTATIONS))
def test_hvp_with_dropout_matches_float64_given_the_mask(implementation):
    """Forward-over-reverse with dropout: the second-order path (the kernels' every-tile
    twin) must draw the same mask as the forward."""
    shape = _shape(implementation)
    masks = _masks(shape, True)
    rng = jax.random.key(4)
    args = _inputs(shape, seed=18)
    tangents = _tangents(args, seed=19)
    loss = _loss(_attention(implementation, "dot", masks, dropout_rng=rng))
    got = jax.jit(_hvp(loss))(*args, *tangents)
    mult = _dropout_multiplier(implementation, "dot", shape, True, rng)
    want = _reference(lambda f: _hvp(_loss(f)), _dense64("dot", masks, mult), *args, *tangents)
    _close(got, want, tol=2e-4, label="hvp")


# ---------------------------------------------------------- check_grads in float64

# Both modes on the two paths JAX differentiates in float64; one case in the default run.
DENSE_AND_BLOCKED = [
    pytest.param("xla", "dot", id="xla-dot", marks=pytest.mark.slow),
    pytest.param("xla", "concat", id="xla-concat"),
    pytest.param("blocked", "dot", id="blocked-dot", marks=pytest.mark.slow),
    pytest.param("blocked", "concat", id="blocked-concat", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("implementation", "mode"), DENSE_AND_BLOCKED)
def test_check_grads_order_two_float64(implementation, mode):
    """``jax.test_util.check_grads`` (order 2, forward and reverse) in float64, in
    (q, k, v, scale, weight), masked causal. Without a fully masked row: there the scores
    sit near -1e9, where float64's spacing (1e-7) over the finite difference's step (1e-4)
    leaves a 1e-3 relative error in the numerical derivative itself."""
    from jax.test_util import check_grads

    masks = _masks(SMALL_SHAPE, True, full_row=False)
    with jax.enable_x64(True):
        args = (*_f64(_inputs(SMALL_SHAPE, seed=20)), jnp.float64(SCALE), jnp.float64(WEIGHT))
        fn = jax.jit(_attention(implementation, mode, masks))
        assert fn(*args).dtype == jnp.float64
        check_grads(fn, args, order=2, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)


# -------------------------------------------------------------- bfloat16 and NaN


@pytest.mark.parametrize(("implementation", "mode"), DENSE_AND_BLOCKED)
def test_bfloat16_jvp_and_hvp(implementation, mode):
    """bfloat16 inputs with bfloat16 matmul operands (the mixed-precision product on the
    dense path): jvp and forward-over-reverse HVP within bfloat16 tolerances of float64
    on the same rounded inputs."""
    shape = (B, TQ, TV, DIM, DIM_V)
    masks = _masks(shape, True)
    args = _inputs(shape, seed=21, dtype=jnp.bfloat16)
    tangents = _tangents(args, seed=22)
    fn = _attention(implementation, mode, masks, matmul_dtype=jnp.bfloat16)
    got = jax.jit(_jvp(fn, 3))(*args, *tangents)
    assert got[1].dtype == jnp.bfloat16
    loss = _loss(fn)
    got_hvp = jax.jit(_hvp(loss))(*args, *tangents)
    ref = _dense64(mode, masks)
    want = _reference(lambda f: _jvp(f, 3), ref, *args, *tangents)
    want_hvp = _reference(lambda f: _hvp(_loss(f)), ref, *args, *tangents)
    _close(got, want, tol=BF16, label="jvp")
    _close(got_hvp, want_hvp, tol=BF16, label="hvp")


@pytest.mark.parametrize("implementation", _implementations(("blocked",), IMPLEMENTATIONS))
def test_no_nan_with_every_row_fully_masked(implementation):
    """Every key hidden: jvp and the Hessian in q stay finite (Keras's uniform rows)."""
    shape = SMALL_SHAPE
    q, k, v = _inputs(shape, seed=23)
    masks = (None, np.zeros(shape[:1] + shape[2:3], bool), True)
    fn = _attention(implementation, "dot", masks)
    out, d_out = jax.jit(_jvp(fn, 3))(q, k, v, *_tangents((q, k, v)))
    hess = jax.jit(jax.hessian(lambda q: _loss(fn)(q, k, v)))(q)
    for name, x in (("out", out), ("d_out", d_out), ("hessian", hess)):
        assert np.isfinite(np.asarray(x)).all(), name
    np.testing.assert_allclose(
        out, jnp.broadcast_to(v.mean(1, keepdims=True), out.shape), atol=1e-5
    )


# ------------------------------------------------------- scalars, key=None, rng vmap


@pytest.mark.parametrize("implementation", _implementations(("blocked",), ("xla", "blocked")))
def test_hessian_in_scale_and_concat_weight(implementation):
    """Second order in the traced scalars (folded into the kernels' operands): the 2 x 2
    Hessian of the loss in ``(scale, concat_score_weight)``, "concat", masked causal."""
    masks = _masks((B, TQ, TV, DIM, DIM_V), True)
    q, k, v = _inputs((B, TQ, TV, DIM, DIM_V), seed=24)

    def of_scalars(fn):
        return jax.hessian(lambda s, w: _loss(fn)(q, k, v, s, w), (0, 1))

    got = jax.jit(of_scalars(_attention(implementation, "concat", masks)))(
        jnp.float32(SCALE), jnp.float32(WEIGHT)
    )
    with jax.enable_x64(True):
        q, k, v = _f64((q, k, v))
        want = jax.jit(of_scalars(_dense64("concat", masks)))(
            jnp.float64(SCALE), jnp.float64(WEIGHT)
        )
    _close(got, jax.tree.map(np.asarray, want), tol=2e-4, label="hessian")


@pytest.mark.parametrize("implementation", _implementations((), IMPLEMENTATIONS))
def test_jvp_and_hvp_with_the_value_as_key(implementation):
    """``key=None``: the value's tangent enters both products."""
    shape = _shape(implementation)
    b, tq, tv, dim, _ = shape
    shape = (b, tq, tv, dim, dim)
    masks = _masks(shape, True)
    q, _, v = _inputs(shape, seed=25)
    dq, dv = _tangents((q, v), seed=26)

    def value_as_key(fn):
        return lambda q, v: fn(q, v, v)

    fn = value_as_key(_attention(implementation, "dot", masks))
    ref = value_as_key(_dense64("dot", masks))

    def hvp(f):
        return lambda q, v, dq, dv: jax.jvp(jax.grad(_loss(f), (0, 1)), (q, v), (dq, dv))[1]

    got = jax.jit(_jvp(fn, 2))(q, v, dq, dv)
    got_hvp = jax.jit(hvp(fn))(q, v, dq, dv)
    _close(got, _reference(lambda f: _jvp(f, 2), ref, q, v, dq, dv), label="jvp")
    _close(got_hvp, _reference(hvp, ref, q, v, dq, dv), tol=2e-4, label="hvp")


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["blocked", "pallas"])
def test_vmap_over_dropout_rngs_of_jvp(implementation):
    """``vmap`` of ``jvp`` over a stack of dropout keys: each slice is the dense formula's
    jvp with that key's multipliers (the kernels' per-call dropout streams under vmap)."""
    shape = _shape(implementation)
    masks = _masks(shape, True)
    args = _inputs(shape, seed=27)
    tangents = _tangents(args, seed=28)
    keys = jax.random.split(jax.random.key(5), 3)

    def one(rng):
        return jax.jvp(_attention(implementation, "dot", masks, dropout_rng=rng), args, tangents)

    got = jax.jit(jax.vmap(one))(keys)
    for i, rng in enumerate(keys):
        mult = _dropout_multiplier(implementation, "dot", shape, True, rng)
        want = _reference(lambda f: _jvp(f, 3), _dense64("dot", masks, mult), *args, *tangents)
        _close(jax.tree.map(lambda x, i=i: x[i], got), want, label=f"key {i}")
