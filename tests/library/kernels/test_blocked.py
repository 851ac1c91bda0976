"""The blocked path equals the dense ("xla") path: outputs, weights, lse and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from luong_attention import attention, blocked_attention_with_lse
from luong_attention._src.kernels import blocked

# All sizes distinct; lengths are not multiples of the blocks used below.
B, TQ, TV, DIM, DIM_V = 3, 37, 29, 5, 6


def _inputs(seed=0, batch=(B,), tq=TQ, tv=TV, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(*batch, tq, DIM)), dtype)
    k = jnp.asarray(rng.normal(size=(*batch, tv, DIM)), dtype)
    v = jnp.asarray(rng.normal(size=(*batch, tv, DIM_V)), dtype)
    return q, k, v


def _masks(seed=1, batch=(B,), tq=TQ, tv=TV):
    """Random masks where example 0 has no visible key at all and example 1 a masked prefix,
    so that both the non-causal and the causal path meet fully masked rows."""
    rng = np.random.default_rng(seed)
    value_mask = rng.random((*batch, tv)) > 0.4
    query_mask = rng.random((*batch, tq)) > 0.3
    if batch and batch[0] >= 2:
        value_mask[0] = False
        value_mask[1, :11] = False
    return jnp.asarray(query_mask), jnp.asarray(value_mask)


def _loss(implementation, mode, causal, query_mask, value_mask, blocks):
    """A scalar loss of the output (and the output), through the public entry points."""
    kwargs = dict(value_mask=value_mask, use_causal_mask=causal, score_mode=mode)

    def loss(q, k, v, scale, weight):
        if implementation == "blocked" and blocks is not None:
            out, _ = blocked_attention_with_lse(
                q,
                v,
                k,
                scale=scale,
                concat_score_weight=weight,
                block_q=blocks[0],
                block_kv=blocks[1],
                **kwargs,
            )
            if query_mask is not None:
                out = jnp.where(query_mask[..., None], out, 0.0)
        else:
            out = attention(
                q,
                v,
                k,
                query_mask=query_mask,
                scale=scale,
                concat_score_weight=weight,
                implementation=implementation,
                **kwargs,
            )
        # A non-uniform cotangent, so every gradient term is exercised.
        return (out * jnp.cos(jnp.arange(out.size).reshape(out.shape))).sum(), out

    return loss


@pytest.mark.parametrize("mode", ["dot", "concat"])
@pytest.mark.parametrize(
    ("causal", "masks", "blocks"),
    [
        (False, "none", (8, 7)),
        (True, "both", (8, 7)),  # fully masked rows on diagonal and skipped tiles
        (False, "both", None),
        (True, "none", None),
        (True, "value", (16, 32)),  # blocks larger than the lengths
        (False, "query", (5, 3)),
    ],
)
def test_blocked_matches_dense(mode, causal, masks, blocks):
    _check_against_dense(mode, causal, masks, blocks)


def _check_against_dense(mode, causal, masks, blocks):
    """Outputs and gradients (query, key, value, scale, weight) of both paths agree."""
    q, k, v = _inputs()
    query_mask, value_mask = _masks()
    query_mask = query_mask if masks in ("query", "both") else None
    value_mask = value_mask if masks in ("value", "both") else None
    weight = 1.3 if mode == "concat" else None
    argnums = (0, 1, 2, 3, 4) if mode == "concat" else (0, 1, 2, 3)
    grads, outs = [], []
    for impl in ("xla", "blocked"):
        loss = _loss(impl, mode, causal, query_mask, value_mask, blocks)
        (_, out), grad = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(
            q, k, v, 0.7, weight
        )
        outs.append(out)
        grads.append(grad)
    np.testing.assert_allclose(outs[1], outs[0], atol=2e-6, rtol=1e-5)
    for name, g_blocked, g_dense in zip("qkvsw"[: len(argnums)], grads[1], grads[0], strict=True):
        assert np.all(np.isfinite(g_blocked)), name
        np.testing.assert_allclose(g_blocked, g_dense, atol=5e-5, rtol=1e-4, err_msg=name)


def _numpy_lse(q, k, value_mask, causal, q_offset=0, kv_offset=0):
    """Row logsumexp of the masked dot scores, with NumPy in float64."""
    s = np.einsum("bqd,bkd->bqk", np.float64(q), np.float64(k))
    allowed = np.ones(s.shape, bool)
    if value_mask is not None:
        allowed &= np.asarray(value_mask)[:, None, :]
    if causal:
        rows = q_offset + np.arange(s.shape[1])[:, None]
        cols = kv_offset + np.arange(s.shape[2])[None, :]
        allowed &= cols <= rows
    s = np.where(allowed, s, s - 1e9)
    top = s.max(-1, keepdims=True)
    return (top + np.log(np.exp(s - top).sum(-1, keepdims=True)))[..., 0]


@pytest.mark.parametrize("causal", [False, True])
def test_lse_value_and_gradient(causal):
    q, k, v = _inputs(2)
    _, value_mask = _masks(3)
    value_mask = value_mask.at[0].set(True)  # no fully masked rows: lse is well conditioned
    _, lse = blocked_attention_with_lse(
        q, v, k, value_mask=value_mask, use_causal_mask=causal, block_q=8, block_kv=7
    )
    assert lse.dtype == jnp.float32 and lse.shape == (B, TQ)
    np.testing.assert_allclose(lse, _numpy_lse(q, k, value_mask, causal), rtol=1e-5, atol=1e-5)

    # d lse / d s = softmax weights: compare with autodiff of a dense logsumexp.
    def dense(q, k):
        s = jnp.einsum("bqd,bkd->bqk", q, k)
        allowed = value_mask[:, None, :]
        if causal:
            allowed = allowed & jnp.tril(jnp.ones((TQ, TV), bool))
        return jax.nn.logsumexp(jnp.where(allowed, s, s - 1e9), axis=-1)

    def blocked(q, k):
        return blocked_attention_with_lse(
            q, v, k, value_mask=value_mask, use_causal_mask=causal, block_q=8, block_kv=7
        )[1]

    cot = jnp.sin(jnp.arange(B * TQ).reshape(B, TQ))
    g_dense = jax.grad(lambda q, k: (dense(q, k) * cot).sum(), argnums=(0, 1))(q, k)
    g_blocked = jax.grad(lambda q, k: (blocked(q, k) * cot).sum(), argnums=(0, 1))(q, k)
    for a, b in zip(g_blocked, g_dense, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_shards_merge_with_lse_and_offsets():
    """Causal attention over keys split in two shards, merged with lse, equals the whole."""
    q, k, v = _inputs(4, tq=23, tv=31)
    full = attention(q, v, k, use_causal_mask=True, implementation="xla")
    q_tail = q[:, 9:]  # queries at global positions 9..22
    parts = [
        blocked_attention_with_lse(
            q_tail,
            v[:, lo:hi],
            k[:, lo:hi],
            use_causal_mask=True,
            q_offset=9,
            kv_offset=lo,
            block_q=4,
            block_kv=5,
        )
        for lo, hi in ((0, 13), (13, 31))
    ]
    (out_a, lse_a), (out_b, lse_b) = parts
    lse = jnp.logaddexp(lse_a, lse_b)
    merged = jnp.exp(lse_a - lse)[..., None] * out_a + jnp.exp(lse_b - lse)[..., None] * out_b
    np.testing.assert_allclose(merged, full[:, 9:], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("batch", "tq", "tv"),
    [((), 37, 29), ((2, 3), 13, 11), ((B,), 1, 29), ((B,), 37, 1), ((B,), 1, 1)],
)
@pytest.mark.parametrize("causal", [False, True])
def test_shapes_and_edge_lengths(batch, tq, tv, causal):
    q, k, v = _inputs(5, batch=batch, tq=tq, tv=tv)
    kwargs = dict(use_causal_mask=causal, scale=1.1)
    ref = attention(q, v, k, implementation="xla", **kwargs)
    out = attention(q, v, k, implementation="blocked", **kwargs)
    assert out.shape == ref.shape == (*batch, tq, DIM_V)
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)


def test_broadcast_batch_dims_and_gradients():
    q, k, v = _inputs(6, batch=(2, 3))
    k1, v1 = k[:1], v[:1]  # keys/values shared across the first batch dim

    def loss(impl):
        return lambda q, k, v: attention(q, v, k, implementation=impl).sum()

    g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k1, v1)
    g_blk = jax.grad(loss("blocked"), argnums=(0, 1, 2))(q, k1, v1)
    for a, b in zip(g_blk, g_ref, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("matmul_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["dot", "concat"])
def test_bfloat16(mode, matmul_dtype):
    """Both operand paths forced (the machine's default differs between CPUs)."""
    q, k, v = _inputs(7, dtype=jnp.bfloat16)
    _, value_mask = _masks(8)
    kwargs = dict(
        value_mask=value_mask,
        use_causal_mask=True,
        score_mode=mode,
        scale=0.9,
        matmul_dtype=matmul_dtype,
    )
    ref = attention(q, v, k, implementation="xla", **kwargs)
    out = attention(q, v, k, implementation="blocked", **kwargs)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(out), np.float32(ref), atol=2e-2, rtol=2e-2)
    grads = jax.grad(
        lambda q: attention(q, v, k, implementation="blocked", **kwargs).astype(float).sum()
    )(q)
    assert grads.dtype == jnp.bfloat16 and np.all(np.isfinite(np.float32(grads)))


def test_fully_masked_rows_are_mean_of_values_with_finite_grads():
    q, k, v = _inputs(9)
    value_mask = jnp.zeros((B, TV), bool)
    out = attention(q * 0.01, v, k, value_mask=value_mask, implementation="blocked")
    np.testing.assert_allclose(out, np.broadcast_to(v.mean(1, keepdims=True), out.shape), atol=1e-5)
    grads = jax.grad(
        lambda q, k, v: attention(
            q, v, k, value_mask=value_mask, use_causal_mask=True, implementation="blocked"
        ).sum(),
        argnums=(0, 1, 2),
    )(q, k, v)
    assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("mode", ["dot", "concat"])
@pytest.mark.parametrize("dropout_rate", [0.0, 0.3])
def test_return_attention_scores(mode, dropout_rate):
    q, k, v = _inputs(10)
    query_mask, value_mask = _masks(11)
    kwargs = dict(
        query_mask=query_mask,
        value_mask=value_mask,
        use_causal_mask=True,
        score_mode=mode,
        dropout_rate=dropout_rate,
        dropout_rng=jax.random.key(0),
        return_attention_scores=True,
    )
    out, weights = attention(q, v, k, implementation="blocked", **kwargs)
    # The returned weights are the ones that produced the output.
    expected = jnp.where(query_mask[..., None], jnp.einsum("bqk,bkv->bqv", weights, v), 0.0)
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=1e-5)
    if dropout_rate == 0.0:
        _, ref = attention(q, v, k, implementation="xla", **kwargs)
        np.testing.assert_allclose(weights, ref, atol=1e-6)


def test_dropout_weights_match_output_when_value_adds_batch_dims():
    """The kernel's batch is the broadcast of every input; the returned weights must use the
    same dropout tiles (and tile sizes) as the output when only ``value`` has the extra dim."""
    q, k, _ = _inputs(16, batch=())
    v = jnp.asarray(np.random.default_rng(17).normal(size=(B + 2, TV, DIM_V)), jnp.float32)
    out, weights = attention(
        q,
        v,
        k,
        dropout_rate=0.3,
        dropout_rng=jax.random.key(2),
        return_attention_scores=True,
        implementation="blocked",
    )
    assert weights.shape == (B + 2, TQ, TV)
    np.testing.assert_allclose(out, np.einsum("bqk,bkv->bqv", weights, v), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("batch", "length"), [(1, 9000), (3, 5000), (40, 700), (2, 700), (2, 1024), (1, 1200)]
)
def test_default_dot_tiles_fit_the_budget(batch, length):
    block_q, block_kv = blocked.default_blocks("dot", length, length, 64, batch)
    if batch == 1 and length * length <= blocked.DOT_TILE_ELEMENTS:
        assert (block_q, block_kv) == (length, length)  # one tile
        return
    if length <= blocked.DOT_WHOLE_KV_MAX:
        assert block_kv == length  # all keys in one block, and never a single tile
        assert block_q <= length // 2
    else:
        assert block_kv <= blocked.DOT_BLOCK_KV
    assert block_q <= length
    low, _ = blocked.DOT_BLOCK_Q_RANGE
    assert batch * block_q * block_kv <= max(blocked.DOT_TILE_ELEMENTS, batch * low * block_kv)
    # Balanced: the padding of the last block is less than one block of either kind.
    assert -length % block_q < block_q and -length % block_kv < block_kv


@pytest.mark.parametrize("length", [4100, 9000, 20000])
def test_default_causal_query_blocks_leave_tiles_to_skip(length):
    """A causal query block spans at most a quarter of the queries (and 2048), so the key
    blocks above the diagonal are skipped; without the mask the block stays tall."""
    block_q, _ = blocked.default_blocks("dot", length, length, 64, 1, causal=True)
    assert block_q <= min(length // 4 + 8, blocked.DOT_CAUSAL_BLOCK_Q_MAX)
    tall, _ = blocked.default_blocks("dot", length, length, 64, 1)
    assert tall > block_q


def test_dropout_statistics_and_determinism():
    q, k, v = _inputs(12, tq=300, tv=200)
    rate = 0.25
    kwargs = dict(dropout_rate=rate, return_attention_scores=True, implementation="blocked")
    out, weights = attention(q, v, k, dropout_rng=jax.random.key(3), **kwargs)
    _, clean = attention(q, v, k, return_attention_scores=True)
    kept = np.asarray(weights) != 0
    assert abs(kept.mean() - (1 - rate)) < 0.01
    np.testing.assert_allclose(
        np.asarray(weights)[kept], np.asarray(clean)[kept] / (1 - rate), rtol=1e-5
    )
    # Same key -> same output bit for bit; another key -> another mask.
    again, _ = attention(q, v, k, dropout_rng=jax.random.key(3), **kwargs)
    other, _ = attention(q, v, k, dropout_rng=jax.random.key(4), **kwargs)
    np.testing.assert_array_equal(out, again)
    assert not np.allclose(out, other)
    # Masks differ across batch rows and across tiles (no repeated tile pattern).
    assert not np.array_equal(kept[0], kept[1])


def test_dropout_gradient_matches_dense_with_same_mask():
    """With the mask fixed, the blocked gradient equals the dense one using that mask."""
    q, k, v = _inputs(13)
    rng = jax.random.key(5)

    def blocked(q, k, v):
        return attention(q, v, k, dropout_rate=0.4, dropout_rng=rng, implementation="blocked").sum()

    _, weights = attention(
        q,
        v,
        k,
        dropout_rate=0.4,
        dropout_rng=rng,
        implementation="blocked",
        return_attention_scores=True,
    )
    keep = np.asarray(weights) != 0

    def dense(q, k, v):
        w = jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", q, k), axis=-1)
        return jnp.einsum("bqk,bkv->bqv", jnp.where(keep, w / 0.6, 0.0), v).sum()

    for a, b in zip(
        jax.grad(blocked, argnums=(0, 1, 2))(q, k, v),
        jax.grad(dense, argnums=(0, 1, 2))(q, k, v),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)


def test_long_sequence_matches_dense():
    q, k, v = _inputs(14, batch=(1,), tq=3001, tv=2999)
    _, value_mask = _masks(15, batch=(1,), tq=3001, tv=2999)
    kwargs = dict(value_mask=value_mask, use_causal_mask=True, scale=0.3)
    loss = lambda impl: jax.jit(  # noqa: E731
        jax.value_and_grad(
            lambda q, k: attention(q, v, k, implementation=impl, **kwargs).sum(), argnums=(0, 1)
        )
    )
    (out_r, g_r), (out_b, g_b) = loss("xla")(q, k), loss("blocked")(q, k)
    np.testing.assert_allclose(out_b, out_r, rtol=1e-4)
    for a, b in zip(g_b, g_r, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)


def test_bad_block_sizes():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="block_q"):
        blocked_attention_with_lse(q, v, k, block_q=0)
    with pytest.raises(ValueError, match="block_kv"):
        blocked_attention_with_lse(q, v, k, block_kv=2.5)
