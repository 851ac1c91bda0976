"""The flax.nnx counterparts give the linen modules' numbers with the same weights."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.luong_utils import random_variables

from luong_attention import luong
from luong_attention import nnx as lnnx

B, TQ, TV, DIN, H, DM = 2, 4, 6, 3, 5, 7  # all distinct
MASK = np.arange(TV) < np.array([[6], [3]])


def _data():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return (
        jax.random.normal(k1, (B, TQ, H)),
        jax.random.normal(k2, (B, TV, DM)),
        jax.random.normal(k3, (B, TQ, DIN)),
    )


def _copy_attention(linen_params, module):
    """Writes linen's attention parameters into the nnx module (same names and shapes)."""
    for name, value in linen_params.items():
        getattr(module, name).set_value(value)


def _abstract(build):
    """The module with abstract parameters (no initialiser runs); every one is set below,
    so a parameter left unset fails the test."""
    return nnx.eval_shape(build)


CONFIGS = [
    dict(score="general", use_scale=True),
    dict(score="concat", units=4, mode="local-m", window=1),
    dict(score="location", max_length=8, mode="local-p", window=2),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['score']}-{c.get('mode')}")
def test_attention_equals_linen(config):
    query, memory, _ = _data()
    linen = luong.LuongAttention(**config)
    variables = random_variables(linen.init, jax.random.key(1), query, memory, MASK)
    module = _abstract(lambda: lnnx.LuongAttention(H, DM, **config, rngs=nnx.Rngs(2)))
    _copy_attention(variables["params"], module)
    got, want = module(query, memory, MASK), linen.apply(variables, query, memory, MASK)
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], atol=1e-7)
    one = nnx.jit(lambda m, q: m(q, memory, MASK, positions=1))(module, query[:, 1])
    want = linen.apply(variables, query[:, 1], memory, MASK, positions=1)
    np.testing.assert_allclose(one[1], want[1], atol=1e-7)


def test_decoder_cell_equals_linen_under_rnn():
    _, memory, x = _data()
    attention = dict(score="general", mode="local-p", window=2)
    cell = luong.AttentionalDecoderCell(nn.LSTMCell(H), luong.LuongAttention(**attention))
    carry = cell.initialize_carry(jax.random.key(0), x[:, 0].shape, memory, MASK)
    rnn = nn.RNN(cell)
    variables = random_variables(rnn.init, jax.random.key(1), x, initial_carry=carry)
    want = jax.jit(rnn.apply)(variables, x, initial_carry=carry)

    params = variables["params"]["cell"]

    def build():
        lstm = nnx.LSTMCell(DIN + H, H, rngs=nnx.Rngs(3))
        nnx_attention = lnnx.LuongAttention(H, DM, **attention, rngs=nnx.Rngs(4))
        return lnnx.AttentionalDecoderCell(lstm, nnx_attention, rngs=nnx.Rngs(5))

    nnx_cell = _abstract(build)
    for name, layer in params["cell"].items():
        target = getattr(nnx_cell.cell, "if_" if name == "if" else name)
        for leaf, value in layer.items():
            getattr(target, leaf).set_value(value)
    _copy_attention(params["attention"], nnx_cell.attention)
    nnx_cell.w_c.set_value(params["w_c"])

    nnx_carry = nnx_cell.initialize_carry(x[:, 0].shape, memory=memory, memory_mask=MASK)
    assert jax.tree.structure(nnx_carry) == jax.tree.structure(carry)
    got = nnx.RNN(nnx_cell)(x, initial_carry=nnx_carry)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_nnx_errors():
    with pytest.raises(ValueError, match="needs mode='local-m' or mode='local-p'"):
        lnnx.LuongAttention(H, DM, window=3, rngs=nnx.Rngs(0))
    attention = lnnx.LuongAttention(H, DM, rngs=nnx.Rngs(0))
    cell = lnnx.AttentionalDecoderCell(
        nnx.LSTMCell(DIN + H, H, rngs=nnx.Rngs(1)), attention, rngs=nnx.Rngs(2)
    )
    with pytest.raises(ValueError, match="needs the memory"):
        cell.initialize_carry((B, DIN))
    with pytest.raises(ValueError, match="needs the memory"):
        nnx.RNN(cell)(jnp.zeros((B, TQ, DIN)))
