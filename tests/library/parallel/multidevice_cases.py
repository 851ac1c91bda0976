"""Cases that need 8 host devices; run by tests/library/parallel/test_parallel.py in a child pytest.

Not collected on its own (the name does not start with ``test_``): the parent sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts, so the rest of the
suite keeps one device. The single-device core :func:`luong_attention.attention` (checked
against Keras in its own tests) is the reference.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import luong_attention as la
from luong_attention import parallel as lap
from luong_attention._src.parallel import sequence
from luong_attention.luong import LuongAttention

TOL = {"rtol": 1e-5, "atol": 1e-5}


def test_has_eight_devices():
    assert jax.device_count() == 8, jax.devices()


def _mesh(devices: int, name: str = "sp") -> Mesh:
    return Mesh(np.array(jax.devices()[:devices]), (name,))


def _inputs(batch, q_length, kv_length, depth, value_depth, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    query = (spread * rng.normal(size=(*batch, q_length, depth))).astype(np.float32)
    key = rng.normal(size=(*batch, kv_length, depth)).astype(np.float32)
    value = rng.normal(size=(*batch, kv_length, value_depth)).astype(np.float32)
    return query, key, value


def _masks(batch, q_length, kv_length, seed=1):
    """Random masks with one fully masked value row and one masked query."""
    rng = np.random.default_rng(seed)
    value_mask = rng.random((*batch, kv_length)) > 0.4
    rows = value_mask.reshape(-1, kv_length)  # a view: batch rows, whatever the batch dims
    rows[0] = False  # every query of batch row 0 sees no key at all
    rows[-1, :3] = False  # with causal: the first 3 queries of the last row see nothing
    rows[-1, 3] = True
    query_mask = rng.random((*batch, q_length)) > 0.2
    return query_mask, value_mask


def _loss_and_grads(fn, query, key, value, scale, weight, kwargs, cotangent):
    """Output and gradients wrt (query, key, value, scale, concat_score_weight), jitted."""

    def loss(query, key, value, scale, weight):
        extra = {"concat_score_weight": weight} if kwargs["score_mode"] == "concat" else {}
        out = fn(query, value, key, scale=scale, **extra, **kwargs)
        return jnp.sum(out * cotangent), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(
        query, key, value, scale, weight
    )
    return out, grads


# (devices, score_mode, masks, causal, kv_length): the numerics of both strategies over many
# shapes run in this process (test_in_process.py); these few cases check what shard_map adds
# (padding, masks, batch dims and gradients through the mesh), an uneven split included.
SP_CASES = [
    (4, "dot", True, False, 11),
    (8, "concat", True, True, 11),
]


@pytest.mark.parametrize(("devices", "score_mode", "masked", "causal", "kv_length"), SP_CASES)
def test_sequence_parallel_matches_core(devices, score_mode, masked, causal, kv_length):
    batch, q_length, depth, value_depth = (3,), 7, 5, 6
    query, key, value = _inputs(batch, q_length, kv_length, depth, value_depth)
    kwargs = {"score_mode": score_mode, "use_causal_mask": causal}
    if masked:
        kwargs["query_mask"], kwargs["value_mask"] = _masks(batch, q_length, kv_length)
    cotangent = np.random.default_rng(2).normal(size=(*batch, q_length, value_depth))
    mesh = _mesh(devices)

    def parallel(*args, **kw):
        return lap.sequence_parallel_attention(
            *args, mesh=mesh, axis_name="sp", strategy="replicated", **kw
        )

    _assert_matches_core(parallel, query, key, value, kwargs, cotangent)


def _assert_matches_core(fn, query, key, value, kwargs, cotangent):
    """``fn``'s output and gradients (query, key, value, scale, concat_score_weight) equal
    the single-device core's to 1e-5, all finite."""
    scale, weight = np.float32(0.7), np.float32(1.3)
    out, grads = _loss_and_grads(fn, query, key, value, scale, weight, kwargs, cotangent)
    ref_out, ref_grads = _loss_and_grads(
        la.attention, query, key, value, scale, weight, kwargs, cotangent
    )
    np.testing.assert_allclose(out, ref_out, **TOL)
    for name, got, want in zip(
        ("query", "key", "value", "scale", "weight"), grads, ref_grads, strict=True
    ):
        assert np.all(np.isfinite(got)), name
        np.testing.assert_allclose(got, want, **TOL, err_msg=name)
    if kwargs["score_mode"] == "dot":  # concat_score_weight is unused there
        assert float(grads[4]) == 0.0


# (devices, score_mode, masked, causal, q_length, kv_length, layout, batch): Tq != Tv, an
# uneven contiguous split with two batch dims, and zigzag (see SP_CASES for the rest).
RING_CASES = [
    (4, "dot", True, True, 7, 11, "contiguous", (2, 2)),
    (8, "concat", True, False, 32, 16, "zigzag", (3,)),
]


@pytest.mark.parametrize(
    ("devices", "score_mode", "masked", "causal", "q_length", "kv_length", "layout", "batch"),
    RING_CASES,
)
def test_ring_matches_core(devices, score_mode, masked, causal, q_length, kv_length, layout, batch):
    """Ring attention equals the core; zigzag inputs are reordered with to_zigzag and the
    output put back with from_zigzag, so the gradients reach the natural order too."""
    depth, value_depth = 5, 6
    query, key, value = _inputs(batch, q_length, kv_length, depth, value_depth)
    kwargs = {"score_mode": score_mode, "use_causal_mask": causal}
    if masked:
        kwargs["query_mask"], kwargs["value_mask"] = _masks(batch, q_length, kv_length)
    cotangent = np.random.default_rng(2).normal(size=(*batch, q_length, value_depth))
    mesh = _mesh(devices)

    def ring(query, value, key, **kw):
        if layout == "zigzag":
            query, value, key = (lap.to_zigzag(x, devices) for x in (query, value, key))
            for name in ("query_mask", "value_mask"):
                if name in kw:
                    kw[name] = lap.to_zigzag(kw[name], devices, axis=-1)
        out = lap.sequence_parallel_attention(
            query, value, key, mesh=mesh, axis_name="sp", strategy="ring", layout=layout, **kw
        )
        return lap.from_zigzag(out, devices) if layout == "zigzag" else out

    _assert_matches_core(ring, query, key, value, kwargs, cotangent)


def _assert_jvp_matches_core(fn, core, primals, seed=3):
    """``jax.jvp`` of ``fn`` (jitted) equals that of ``core`` for random tangents."""
    rng = np.random.default_rng(seed)
    tangents = tuple(rng.normal(size=x.shape).astype(np.float32) for x in primals)
    out, d_out = jax.jit(lambda p, t: jax.jvp(fn, p, t))(primals, tangents)
    ref_out, ref_d_out = jax.jvp(core, primals, tangents)
    np.testing.assert_allclose(out, ref_out, **TOL)
    np.testing.assert_allclose(d_out, ref_d_out, rtol=1e-4, atol=1e-4)


def test_ring_jvp_through_the_mesh_equals_core():
    """Forward mode through shard_map on 4 devices: causal "dot", contiguous, Tq != Tv, a
    fully masked row and padding keys; against the dense XLA core."""
    query, key, value = _inputs((2,), 7, 11, 5, 6)
    kwargs = {"value_mask": _masks((2,), 7, 11)[1], "use_causal_mask": True}
    mesh = _mesh(4)

    def ring(query, key, value):
        return lap.sequence_parallel_attention(
            query, value, key, mesh=mesh, axis_name="sp", strategy="ring", **kwargs
        )

    def core(query, key, value):
        return la.attention(query, value, key, implementation="xla", **kwargs)

    _assert_jvp_matches_core(ring, core, (query, key, value))


def test_ring_keeps_every_array_split_and_takes_sharded_inputs():
    """Inputs given split along the sequence; the output comes back split the same way."""
    mesh = _mesh(4)
    query, key, value = _inputs((2,), 8, 12, 5, 3)
    split = NamedSharding(mesh, P(None, "sp", None))
    query, key, value = (jax.device_put(x, split) for x in (query, key, value))
    fn = jax.jit(
        lambda q, v, k: lap.sequence_parallel_attention(
            q, v, k, mesh=mesh, axis_name="sp", use_causal_mask=True
        )
    )
    out = fn(query, value, key)
    assert out.sharding.is_equivalent_to(split, out.ndim)
    ref = la.attention(np.asarray(query), np.asarray(value), np.asarray(key), use_causal_mask=True)
    np.testing.assert_allclose(out, ref, **TOL)


@pytest.mark.parametrize("strategy", ["replicated", "ring"])
def test_fully_masked_rows_with_large_scores_keep_keras_fill(strategy):
    """Scores of +-100: the core's ``score - 1e9`` rounds them to multiples of 64, so a fully
    masked row is not a plain mean; the merge must reproduce that, and padding must not count."""
    batch, q_length, kv_length, depth, value_depth = (2,), 3, 13, 4, 5
    query, key, value = _inputs(batch, q_length, kv_length, depth, value_depth, spread=40.0)
    value_mask = np.ones((*batch, kv_length), bool)
    value_mask[1] = False
    mesh = _mesh(4)
    out = jax.jit(
        lambda q, v, k, vm: lap.sequence_parallel_attention(
            q, v, k, mesh=mesh, axis_name="sp", value_mask=vm, strategy=strategy
        )
    )(query, value, key, value_mask)
    ref = la.attention(query, value, key, value_mask=value_mask)
    assert np.abs(ref[1] - value[1].mean(0)).max() > 1e-2  # really not the plain mean
    np.testing.assert_allclose(out, ref, **TOL)


def test_unbatched_key_defaults_to_value_and_jit_with_sharded_inputs():
    mesh = _mesh(4)
    query, _, value = _inputs((), 6, 8, 5, 5)
    value = jax.device_put(value, NamedSharding(mesh, P("sp", None)))  # already split
    fn = jax.jit(lambda q, v: lap.sequence_parallel_attention(q, v, mesh=mesh, axis_name="sp"))
    out = fn(query, value)
    np.testing.assert_allclose(out, la.attention(query, value), **TOL)
    assert out.shape == (6, 5)


@pytest.mark.parametrize("strategy", ["replicated", "ring"])
def test_data_and_sequence_parallel_on_a_2x4_mesh(strategy):
    """batch_axis: batch split over "data" (2), keys over "sp" (4); the key has no batch dim
    and is replicated over "data". Outputs and gradients equal the core's."""
    batch, q_length, kv_length, depth, value_depth = (4,), 8, 10, 5, 6
    query, _, value = _inputs(batch, q_length, kv_length, depth, value_depth)
    key = np.random.default_rng(3).normal(size=(kv_length, depth)).astype(np.float32)
    query_mask, value_mask = _masks(batch, q_length, kv_length)
    kwargs = {"score_mode": "dot", "use_causal_mask": True}
    kwargs |= {"query_mask": query_mask, "value_mask": value_mask}
    cotangent = np.random.default_rng(2).normal(size=(*batch, q_length, value_depth))
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "sp"))

    def parallel(*args, **kw):
        return lap.sequence_parallel_attention(
            *args, mesh=mesh, axis_name="sp", batch_axis="data", strategy=strategy, **kw
        )

    scale, weight = np.float32(0.7), np.float32(1.3)
    out, grads = _loss_and_grads(parallel, query, key, value, scale, weight, kwargs, cotangent)
    ref_out, ref_grads = _loss_and_grads(
        la.attention, query, key, value, scale, weight, kwargs, cotangent
    )
    seq = "sp" if strategy == "ring" else None
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data", seq)), out.ndim)
    np.testing.assert_allclose(out, ref_out, **TOL)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, **TOL)


def test_batch_axis_must_divide_the_batch():
    query, key, value = _inputs((3,), 4, 5, 6, 7)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "sp"))
    with pytest.raises(ValueError, match="batch_axis must differ from axis_name"):
        lap.sequence_parallel_attention(
            query, value, key, mesh=mesh, axis_name="sp", batch_axis="data"
        )


def test_bad_axis_name_is_a_value_error():
    query, key, value = _inputs((2,), 3, 4, 5, 6)
    with pytest.raises(ValueError, match="axis_name must be one of the mesh's axes"):
        lap.sequence_parallel_attention(query, value, key, mesh=_mesh(2), axis_name="seq")


@pytest.mark.parametrize("score_mode", ["dot", "concat"])
def test_data_parallel_batch_sharded_matches_single_device(score_mode):
    """attention and the module unchanged on inputs sharded over the batch with NamedSharding."""
    batch, q_length, kv_length, depth, value_depth = (8,), 5, 7, 3, 4
    query, key, value = _inputs(batch, q_length, kv_length, depth, value_depth)
    query_mask, value_mask = _masks(batch, q_length, kv_length)
    mesh = _mesh(8, "data")
    shard = NamedSharding(mesh, P("data"))
    sharded = [jax.device_put(x, shard) for x in (query, value, key, query_mask, value_mask)]

    def fn(q, v, k, qm, vm):
        return la.attention(q, v, k, query_mask=qm, value_mask=vm, score_mode=score_mode)

    out = jax.jit(fn)(*sharded)
    assert out.sharding.is_equivalent_to(shard, out.ndim)
    np.testing.assert_allclose(out, fn(query, value, key, query_mask, value_mask), **TOL)

    module = la.Attention(use_scale=True, score_mode=score_mode)
    variables = module.init(jax.random.key(0), [query, value, key])
    apply = jax.jit(lambda v, q, val, k, qm, vm: module.apply(v, [q, val, k], mask=[qm, vm]))
    out = apply(variables, *sharded)
    assert out.sharding.is_equivalent_to(shard, out.ndim)
    ref = module.apply(variables, [query, value, key], mask=[query_mask, value_mask])
    np.testing.assert_allclose(out, ref, **TOL)


@pytest.mark.parametrize("strategy", ["replicated", "ring", "ring-bfloat16-operands"])
def test_bfloat16_keeps_dtype_and_matches_core(strategy, monkeypatch):
    """Half-precision inputs: float32 statistics inside, output in bfloat16, as the core.
    "ring-bfloat16-operands" makes the ring multiply in bfloat16 (as on hardware with bf16
    matrix units; this CPU multiplies in float32), with float32 accumulators."""
    if strategy == "ring-bfloat16-operands":
        monkeypatch.setattr(sequence, "resolve_matmul_dtype", lambda dtype: jnp.dtype(dtype))
        strategy = "ring"
    query, key, value = (x.astype(jnp.bfloat16) for x in _inputs((2,), 6, 10, 5, 3))
    _, value_mask = _masks((2,), 6, 10)
    kwargs = {"value_mask": value_mask, "use_causal_mask": True}
    mesh = _mesh(4)
    out = jax.jit(
        lambda q, v, k: lap.sequence_parallel_attention(
            q, v, k, mesh=mesh, axis_name="sp", strategy=strategy, **kwargs
        )
    )(query, value, key)
    ref = la.attention(query, value, key, **kwargs)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2
    )


def test_strategy_none_picks_ring_for_long_queries_and_replicated_for_short():
    mesh = _mesh(4)
    _, key, value = _inputs((2,), 1, 16, 5, 3)
    fn = jax.jit(
        lambda q, v, k: lap.sequence_parallel_attention(q, v, k, mesh=mesh, axis_name="sp")
    )
    for q_length, strategy, spec in ((4, "ring", P(None, "sp")), (3, "replicated", P())):
        assert lap.select_strategy(q_length, 16, 4) == strategy
        query = _inputs((2,), q_length, 16, 5, 3)[0]
        out = fn(query, value, key)
        assert out.sharding.is_equivalent_to(NamedSharding(mesh, spec), out.ndim), strategy
        np.testing.assert_allclose(out, la.attention(query, value, key), **TOL)


@pytest.mark.parametrize(
    ("kwargs", "q_length", "match"),
    [
        ({"layout": "zigzag"}, 12, r"q_length \(query.shape\[-2\]\) must be a multiple of 8"),
        ({"layout": "zigzag", "strategy": "replicated"}, 16, "layout='zigzag' is a layout of"),
        ({"strategy": "all-gather"}, 16, "strategy must be one of"),
        ({"layout": "zig"}, 16, "layout must be one of"),
        ({"dropout_rate": 0.1}, 16, "has no dropout"),
        ({"batch_axis": "sp"}, 16, "batch_axis must differ from axis_name"),
    ],
)
def test_bad_strategy_layout_and_lengths_are_value_errors(kwargs, q_length, match):
    query, key, value = _inputs((2,), q_length, 16, 5, 3)
    with pytest.raises(ValueError, match=match):
        lap.sequence_parallel_attention(query, value, key, mesh=_mesh(4), axis_name="sp", **kwargs)


class _Model(nn.Module):
    """Dense -> causal self-attention (sequence parallel when given a mesh) -> Dense."""

    layer: str
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x, mask):
        hidden = nn.Dense(6)(x)
        seq = {"mesh": self.mesh, "sequence_axis": None if self.mesh is None else "sp"}
        kind, score = self.layer.split("-")
        if kind == "keras":
            attend = la.Attention(use_scale=True, score_mode=score, **seq)
            out = attend([hidden, hidden], mask=[None, mask], use_causal_mask=True)
        else:
            out, _ = LuongAttention(score=score, use_scale=True, **seq)(hidden, hidden, mask)
        return nn.Dense(3)(out)


@pytest.mark.parametrize(
    ("layer", "devices"), [("keras-concat", 4), ("luong-general", 8), ("luong-dot", 2)]
)
def test_flax_model_parameter_gradients_equal_single_device(layer, devices):
    """A jit-compiled Flax model over a mesh: output and every parameter's gradient equal the
    same model without sequence parallelism, on one device."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 13, 4)).astype(np.float32)
    mask = rng.random((2, 13)) > 0.3
    cotangent = rng.normal(size=(2, 13, 3)).astype(np.float32)
    reference = _Model(layer)
    variables = reference.init(jax.random.key(0), x, mask)

    def grads(model):
        def loss(variables):
            out = model.apply(variables, x, mask)
            return jnp.sum(out * cotangent), out

        return jax.jit(jax.grad(loss, has_aux=True))(variables)

    got, out = grads(_Model(layer, _mesh(devices)))
    want, ref_out = grads(reference)
    np.testing.assert_allclose(out, ref_out, **TOL)
    flat_got, flat_want = jax.tree.leaves_with_path(got), jax.tree.leaves_with_path(want)
    assert [path for path, _ in flat_got] == [path for path, _ in flat_want]
    for (path, g), (_, w) in zip(flat_got, flat_want, strict=True):
        np.testing.assert_allclose(g, w, **TOL, err_msg=jax.tree_util.keystr(path))


def test_modules_reject_half_a_sequence_setup_and_weights():
    with pytest.raises(ValueError, match="needs both mesh and sequence_axis"):
        la.Attention(sequence_axis="sp")
    with pytest.raises(ValueError, match="supports mode='global' with score='dot' or"):
        LuongAttention(score="concat", mesh=_mesh(2), sequence_axis="sp")
    layer = la.Attention(mesh=_mesh(2), sequence_axis="sp")
    q = np.ones((1, 4, 3), np.float32)
    with pytest.raises(ValueError, match="cannot return them"):
        layer.init_with_output(jax.random.key(0), [q, q], return_attention_scores=True)


@pytest.mark.parametrize("score_mode", ["dot", "concat"])
def test_nnx_attention_sequence_parallel_equals_linen(score_mode):
    """The nnx Attention over a mesh (the same call path as linen's): linen's numbers and
    gradients, with and without the mesh; weights cannot be returned there."""
    from flax import nnx

    from luong_attention import nnx as lnnx

    query, key, value = _inputs((2,), 12, 20, 5, 3, seed=9)
    mask = np.random.default_rng(10).random((2, 20)) > 0.3
    seq = {"mesh": _mesh(4), "sequence_axis": "sp"}
    module = lnnx.Attention(use_scale=True, score_mode=score_mode, **seq)
    linen = la.Attention(use_scale=True, score_mode=score_mode)
    variables = linen.init(jax.random.key(0), [query, value, key])

    def nnx_loss(module, query):
        return jnp.sum(module([query, value, key], mask=[None, mask], use_causal_mask=True))

    def linen_loss(variables, query):
        out = linen.apply(variables, [query, value, key], mask=[None, mask], use_causal_mask=True)
        return jnp.sum(out)

    got = nnx.jit(nnx.value_and_grad(nnx_loss, argnums=(0, 1)))(module, query)
    want = jax.jit(jax.value_and_grad(linen_loss, argnums=(0, 1)))(variables, query)
    np.testing.assert_allclose(got[0], want[0], **TOL)
    np.testing.assert_allclose(got[1][1], want[1][1], **TOL)
    for name, grad in want[1][0]["params"].items():
        np.testing.assert_allclose(got[1][0][name][...], grad, **TOL)
    with pytest.raises(ValueError, match="cannot return them"):
        module([query, value, key], return_attention_scores=True)
