"""The kernel interface: what the sequence-parallel strategies and future kernels rely on.

A kernel's forward gives an online-softmax state whose ``finalise`` is the attention output and
whose ``logsumexp`` is each row's log-normaliser; states over disjoint key blocks ``merge``
into the state over their union, whatever the order, with empty states as the identity. Each
property is checked against a float64 NumPy loop (``helpers.reference``), never against the
kernel itself.
"""

from __future__ import annotations

import contextlib

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.reference import reference_attention
from jax.experimental.pallas import tpu as pltpu

from luong_attention._src.kernels import api
from luong_attention._src.kernels.registry import KERNELS, get_kernel

# (B, Tq, Tv, depth, dim_v), all distinct.
B, TQ, TV, DIM, DIM_V = 3, 13, 11, 4, 5
TOL = {"rtol": 1e-5, "atol": 1e-5}
# The kernels as they run here: the blocked kernel; the Pallas GPU kernel through its
# interpreted twin (``pallas_gpu`` itself only lowers here), with Triton's tiles (powers of two,
# at least 16); the Pallas TPU kernel in Mosaic interpret mode with TPU tiles (8, 128). The
# Pallas kernels compute "dot" only ("concat" is routed to the blocked kernel).
_INTERPRET = {"pallas_tpu": pltpu.force_tpu_interpret_mode}
_BLOCKS = {"pallas_gpu_interpret": (16, 16), "pallas_tpu": (8, 128)}
_RUN_HERE = ("blocked", "pallas_gpu_interpret", "pallas_tpu")
_KERNEL_MODES = [
    (name, mode)
    for name in _RUN_HERE
    for mode in ("dot", "concat")
    if mode == "dot" or not name.startswith("pallas_")
]


def _operands(score_mode: str, seed: int = 0):
    """Float32 operands, a value mask with a fully masked row, and ``concat_score_weight``."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, TQ, DIM)).astype(np.float32)
    k = rng.normal(size=(B, TV, DIM)).astype(np.float32)
    v = rng.normal(size=(B, TV, DIM_V)).astype(np.float32)
    mask = rng.random((B, TV)) > 0.3
    mask[1] = False
    weight = 1.3 if score_mode == "concat" else 0.0
    return q, k, v, mask, weight


def _reference(score_mode, causal, q, k, v, mask, weight):
    """float64 output and logsumexp of the masked scores (Keras's fill) per row."""
    out, _ = reference_attention(
        q,
        v,
        k,
        value_mask=mask,
        causal=causal,
        score_mode=score_mode,
        concat_score_weight=weight if score_mode == "concat" else None,
    )
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    if score_mode == "dot":
        scores = np.einsum("bqd,bkd->bqk", q64, k64)
    else:
        scores = weight * np.tanh(q64[:, :, None] + k64[:, None]).sum(-1)
    allowed = np.broadcast_to(mask[:, None, :], scores.shape)
    if causal:
        allowed = allowed & (np.arange(TV)[None, :] <= np.arange(TQ)[:, None])
    filled = np.where(allowed, scores, scores - 1e9)
    top = filled.max(-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(filled - top).sum(-1))
    return out, lse


def _state(kernel, score_mode, causal, q, k, v, mask, weight, kv_offset=0, block=None):
    """The kernel's state of all queries over keys ``k`` placed at ``kv_offset``."""
    block_q, block_kv = _BLOCKS.get(kernel.name, (block, block))
    cfg = kernel.config(
        score_mode,
        q.shape[1],
        k.shape[1],
        DIM,
        causal=causal,
        block_q=block_q,
        block_kv=block_kv,
        batch=B,
    )
    ops = api.Operands(
        jnp.asarray(q),
        jnp.asarray(k),
        jnp.asarray(v),
        jnp.float32(weight),
        jnp.asarray(mask),
        (jnp.int32(0), jnp.int32(kv_offset)),
        None,
    )
    with _INTERPRET.get(kernel.name, contextlib.nullcontext)():
        return kernel.forward(cfg, ops)


@pytest.mark.parametrize(("name", "score_mode"), _KERNEL_MODES)
@pytest.mark.parametrize("causal", [False, True])
def test_finalise_and_logsumexp_of_the_forward_state(name, score_mode, causal):
    """Several tiles (blocks of 4: padded rows and keys), masks, a fully masked row."""
    q, k, v, mask, weight = _operands(score_mode)
    state = _state(get_kernel(name), score_mode, causal, q, k, v, mask, weight, block=4)
    out, lse = _reference(score_mode, causal, q, k, v, mask, weight)
    assert state.m.dtype == state.denom.dtype == state.acc.dtype == jnp.float32
    assert state.acc.shape == (B, TQ, DIM_V) and state.m.shape == state.denom.shape == (B, TQ)
    np.testing.assert_allclose(api.finalise(state), out, **TOL)
    # A fully masked row's lse sits near -1e9, where float32's spacing is 64.
    seen = mask.any(-1)
    np.testing.assert_allclose(api.logsumexp(state)[seen], lse[seen], **TOL)


@pytest.mark.parametrize(("name", "score_mode"), _KERNEL_MODES)
def test_states_of_key_blocks_merge_into_the_whole(name, score_mode):
    """Keys cut at 6 into two calls (causal, global offsets): merged in either order, the
    states give the output over all keys, fully masked rows included (max and denominator
    kept apart)."""
    kernel = get_kernel(name)
    q, k, v, mask, weight = _operands(score_mode, seed=1)
    cut = 6
    first = _state(kernel, score_mode, True, q, k[:, :cut], v[:, :cut], mask[:, :cut], weight)
    second = _state(
        kernel, score_mode, True, q, k[:, cut:], v[:, cut:], mask[:, cut:], weight, kv_offset=cut
    )
    out, _ = _reference(score_mode, True, q, k, v, mask, weight)
    for merged in (api.merge(first, second), api.merge(second, first)):
        np.testing.assert_allclose(api.finalise(merged), out, **TOL)


def test_empty_state_is_the_identity_and_two_empty_states_stay_finite():
    q, k, v, mask, weight = _operands("dot", seed=2)
    state = _state(get_kernel("blocked"), "dot", False, q, k, v, mask, weight)
    empty = api.empty_state(B, TQ, DIM_V, jnp.float32)
    for merged in (api.merge(state, empty), api.merge(empty, state)):
        for got, want in zip(merged, state, strict=True):
            np.testing.assert_array_equal(got, want)
    nothing = api.merge(empty, empty)
    assert np.isneginf(nothing.m).all() and (nothing.denom == 0).all()
    np.testing.assert_array_equal(api.finalise(nothing), np.zeros((B, TQ, DIM_V)))


def test_every_kernel_is_tested_here_and_unknown_kernels_are_a_value_error():
    assert set(KERNELS) == {*_RUN_HERE, "pallas_gpu"}  # a new kernel must join _RUN_HERE
    with pytest.raises(
        ValueError, match=r"kernel must be one of \['blocked', .*\]. Received: 'cuda'"
    ):
        get_kernel("cuda")
