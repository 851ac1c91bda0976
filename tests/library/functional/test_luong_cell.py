"""AttentionalDecoderCell: input feeding, h~ = tanh(W_c [c; h]), nn.RNN / jit / grad."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.luong_utils import random_variables

from luong_attention.luong import AttentionalDecoderCell, DecoderState, LuongAttention

B, TQ, TV, DIN, H, DM = 3, 6, 5, 4, 7, 9  # all distinct
LENGTHS = np.array([5, 2, 4])


def _inputs(seed: int = 0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, (B, TQ, DIN))
    memory = jax.random.normal(k2, (B, TV, DM))
    mask = np.arange(TV) < LENGTHS[:, None]
    return x, memory, mask


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


class Built(NamedTuple):
    cell: AttentionalDecoderCell
    rnn: nn.RNN
    variables: dict
    x: jax.Array
    memory: jax.Array
    mask: np.ndarray
    carry: DecoderState
    apply: object  # jitted rnn.apply


_CACHE: dict[str, Built] = {}


def _build(attention: LuongAttention, cell=None, **kw) -> Built:
    """Builds (once per configuration: compiling is the slow part) a cell under nn.RNN."""
    key = repr((attention, cell, kw))
    if key not in _CACHE:
        decoder = AttentionalDecoderCell(cell or nn.LSTMCell(H), attention, **kw)
        x, memory, mask = _inputs()
        carry = decoder.initialize_carry(jax.random.key(0), x[:, 0].shape, memory, mask)
        rnn = nn.RNN(decoder)
        variables = random_variables(rnn.init, jax.random.key(1), x, initial_carry=carry)
        apply = jax.jit(rnn.apply)
        _CACHE[key] = Built(decoder, rnn, variables, x, memory, mask, carry, apply)
    return _CACHE[key]


def test_matches_numpy_reference_general_global():
    """A Python loop: the Flax LSTM for h_t, NumPy for attention, W_c and input feeding."""
    b = _build(LuongAttention(score="general"))
    out = b.apply(b.variables, b.x, initial_carry=b.carry)
    params = b.variables["params"]["cell"]
    w_a = np.asarray(params["attention"]["w_a"])  # [DM, H]
    w_c = np.asarray(params["w_c"])  # [DM + H, H]
    lstm = nn.LSTMCell(H)
    lstm_carry = lstm.initialize_carry(jax.random.key(0), (B, DIN + H))
    lstm_step = jax.jit(lstm.apply)
    h_tilde = np.zeros((B, H))
    mem = np.asarray(b.memory, np.float64)
    expected = []
    for t in range(TQ):
        feed = np.concatenate([np.asarray(b.x[:, t]), h_tilde], -1).astype(np.float32)
        lstm_carry, h = lstm_step({"params": params["cell"]}, lstm_carry, feed)
        h = np.asarray(h, np.float64)
        scores = np.einsum("bd,bvm,md->bv", h, mem, w_a)
        a = _softmax(np.where(b.mask, scores, -np.inf))
        c = np.einsum("bv,bvm->bm", a, mem)
        h_tilde = np.tanh(np.concatenate([c, h], -1) @ w_c)
        expected.append(h_tilde)
    np.testing.assert_allclose(out, np.stack(expected, 1), atol=2e-5)


@pytest.mark.parametrize(
    ("attention", "hidden"),
    [
        (LuongAttention(score="dot"), DM),  # dot needs h_t and h_s of one depth
        (LuongAttention(score="concat", mode="local-m", window=0, units=6), H),
        (LuongAttention(score="location", mode="local-p", window=2, max_length=8, units=3), H),
    ],
    ids=["dot-global", "concat-local-m0", "location-local-p"],
)
def test_step_by_step_equals_full_run(attention, hidden):
    b = _build(attention, cell=nn.LSTMCell(hidden), return_alignment=True)
    full_h, full_a = b.apply(b.variables, b.x, initial_carry=b.carry)
    cell_vars = {"params": b.variables["params"]["cell"]}
    step = jax.jit(b.cell.apply)
    carry, hs, aligns = b.carry, [], []
    for t in range(TQ):
        carry, (h, a) = step(cell_vars, carry, b.x[:, t])
        hs.append(h)
        aligns.append(a)
    np.testing.assert_allclose(full_h, jnp.stack(hs, 1), atol=1e-6)
    np.testing.assert_allclose(full_a, jnp.stack(aligns, 1), atol=1e-6)
    assert full_a.shape == (B, TQ, TV)
    padded = ~np.broadcast_to(b.mask[:, None], full_a.shape)
    assert np.all(np.asarray(full_a)[padded] == 0.0)
    np.testing.assert_array_equal(carry.step, np.full(B, TQ))
    if attention.mode == "local-m":  # D = 0: step t attends exactly to source min(t, S-1)
        expected = np.zeros((B, TQ, TV))
        for i in range(B):
            for t in range(TQ):
                expected[i, t, min(t, LENGTHS[i] - 1)] = 1.0
        np.testing.assert_allclose(full_a, expected, atol=1e-7)


def test_padding_does_not_leak():
    """Garbage in padded memory rows leaves the outputs unchanged."""
    b = _build(LuongAttention(score="general"))
    out = b.apply(b.variables, b.x, initial_carry=b.carry)
    noisy = b.carry._replace(memory=jnp.where(b.mask[..., None], b.memory, 1e4))
    np.testing.assert_allclose(b.apply(b.variables, b.x, initial_carry=noisy), out, atol=1e-6)


def test_gru_without_input_feeding_and_other_features():
    """No input feeding: the GRU sees x alone and h~ = tanh(W_c [attention(h); h])."""
    attention = LuongAttention(score="general")
    b = _build(attention, cell=nn.GRUCell(H), input_feeding=False, features=11)
    params = b.variables["params"]["cell"]
    assert params["w_c"].shape == (DM + H, 11)
    out = b.apply(b.variables, b.x, initial_carry=b.carry)
    gru_h = nn.RNN(nn.GRUCell(H)).apply({"params": {"cell": params["cell"]}}, b.x)
    context, _ = attention.apply({"params": params["attention"]}, gru_h, b.memory, b.mask)
    expected = jnp.tanh(jnp.concatenate([context, gru_h], -1) @ params["w_c"])
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_grad_is_finite_with_a_fully_masked_example():
    b = _build(LuongAttention(score="general"))
    mask = b.mask.copy()
    mask[1] = False
    carry = b.cell.initialize_carry(jax.random.key(0), b.x[:, 0].shape, b.memory, mask)

    def loss(params, memory):
        out = b.rnn.apply({"params": params}, b.x, initial_carry=carry._replace(memory=memory))
        return jnp.sum(out**2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(b.variables["params"], b.memory)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads[1]).sum()) > 0.0


def test_vmap_over_an_extra_batch_axis():
    b = _build(LuongAttention(score="general"))
    out = b.apply(b.variables, b.x, initial_carry=b.carry)
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), b.carry)
    batched = jax.vmap(lambda c, x: b.rnn.apply(b.variables, x, initial_carry=c))(
        stacked, jnp.stack([b.x, b.x])
    )
    np.testing.assert_allclose(batched[0], out, atol=1e-6)
    assert not np.allclose(batched[1], out)


def test_carry_errors():
    cell = AttentionalDecoderCell(nn.LSTMCell(H), LuongAttention())
    x, memory, mask = _inputs()
    with pytest.raises(ValueError, match="needs the memory"):
        cell.initialize_carry(jax.random.key(0), x[:, 0].shape)
    with pytest.raises(ValueError, match="needs the memory"):
        jax.eval_shape(nn.RNN(cell).init, jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"memory_mask must have shape \[batch..., Tv\]"):
        cell.initialize_carry(jax.random.key(0), x[:, 0].shape, memory, mask[:, :2])
    carry = cell.initialize_carry(jax.random.key(0), x[:, 0].shape, memory, None)
    assert isinstance(carry, DecoderState)
    assert carry.h_tilde.shape == (B, H)
    assert bool(carry.memory_mask.all())
    with pytest.raises(TypeError, match="must be a DecoderState"):
        jax.eval_shape(cell.init, jax.random.key(0), (jnp.zeros((B, H)),) * 2, x[:, 0])


class _NoFeatures(nn.RNNCellBase):
    """A cell without a ``features`` attribute."""

    @nn.compact
    def __call__(self, carry, x):
        h = jnp.tanh(nn.Dense(5)(jnp.concatenate([carry, x], -1)))
        return h, h

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        return jnp.zeros((*input_shape[:-1], 5))

    @property
    def num_feature_axes(self) -> int:
        return 1


def test_features_needed_for_a_cell_without_them():
    x, memory, mask = _inputs()
    cell = AttentionalDecoderCell(_NoFeatures(), LuongAttention())
    with pytest.raises(ValueError, match="needs features"):
        cell.initialize_carry(jax.random.key(0), x[:, 0].shape, memory, mask)
    cell = AttentionalDecoderCell(_NoFeatures(), LuongAttention(), features=6)
    carry = cell.initialize_carry(jax.random.key(0), x[:, 0].shape, memory, mask)
    assert carry.h_tilde.shape == (B, 6)
