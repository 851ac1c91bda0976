"""Decoding: teacher forcing == full run, greedy, beam search (exhaustive check, beams)."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.luong_utils import random_variables

from luong_attention import decoding, luong

# -- a toy language model whose next-token distribution depends on the whole prefix --------

P, V, EOS = 97, 3, 2
TABLE = np.asarray(jax.random.normal(jax.random.key(0), (P, V)), np.float32) * 2.0


def toy_step(carry, tokens):
    state = (carry * 7 + tokens + 1) % P
    return state, jnp.asarray(TABLE)[state]


def _log_softmax(z):
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def _brute_force(state, start, length, alpha):
    """Every hypothesis (prefix up to EOS, or full length), ranked by normalised score."""
    hyps = {}
    for seq in itertools.product(range(V), repeat=length):
        s, last, log_p, out = state, start, 0.0, []
        for tok in seq:
            s = (s * 7 + last + 1) % P
            log_p += _log_softmax(TABLE[s].astype(np.float64))[tok]
            out.append(tok)
            last = tok
            if tok == EOS:
                break
        hyps[tuple(out)] = (log_p, len(out))
    ranked = sorted(hyps.items(), key=lambda kv: -kv[1][0] / kv[1][1] ** alpha)
    return [(seq + (0,) * (length - len(seq)), lp, n) for seq, (lp, n) in ranked]


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_exhaustive_beam_search_equals_brute_force(alpha):
    length, beams = 3, V**3  # enough beams to keep every hypothesis: the search is exact
    states, starts = np.array([3, 40]), np.array([1, 0])
    out = jax.jit(
        lambda c, s: decoding.beam_search(
            toy_step, c, s, beam_size=beams, max_length=length, eos_id=EOS, length_penalty=alpha
        )
    )(jnp.asarray(states), jnp.asarray(starts))
    for b in range(2):
        expected = _brute_force(states[b], starts[b], length, alpha)
        for k, (seq, log_p, n) in enumerate(expected[:6]):
            np.testing.assert_array_equal(out.tokens[b, k], seq)
            np.testing.assert_allclose(out.log_probs[b, k], log_p, rtol=1e-5)
            assert int(out.lengths[b, k]) == n
            np.testing.assert_allclose(out.scores[b, k], log_p / n**alpha, rtol=1e-5)


def _np_greedy(state, start, length):
    s, last, tokens, log_p, done = state, start, [], 0.0, False
    for _ in range(length):
        s = (s * 7 + last + 1) % P
        lp = _log_softmax(TABLE[s].astype(np.float64))
        tok = 0 if done else int(np.argmax(lp))
        log_p += 0.0 if done else lp[tok]
        tokens.append(tok)
        done = done or tok == EOS
        last = tok
    return tokens, log_p


def test_greedy_matches_a_numpy_loop_and_beam_size_one():
    states, starts = jnp.array([3, 40, 11]), jnp.array([1, 0, 2])
    greedy = decoding.greedy_decode(toy_step, states, starts, max_length=5, eos_id=EOS)
    beam = decoding.beam_search(toy_step, states, starts, beam_size=1, max_length=5, eos_id=EOS)
    for b in range(3):
        tokens, log_p = _np_greedy(int(states[b]), int(starts[b]), 5)
        np.testing.assert_array_equal(greedy.tokens[b], tokens)
        np.testing.assert_allclose(greedy.log_probs[b], log_p, rtol=1e-5)
    np.testing.assert_array_equal(beam.tokens[:, 0], greedy.tokens)
    np.testing.assert_array_equal(beam.lengths[:, 0], greedy.lengths)
    np.testing.assert_allclose(beam.log_probs[:, 0], greedy.log_probs, rtol=1e-6)


def test_batched_beam_search_equals_one_example_at_a_time():
    """Pitfall E4: beams of one example must never see another example's carry."""
    states, starts = jnp.array([3, 40]), jnp.array([1, 0])
    kw = dict(beam_size=4, max_length=4, eos_id=EOS)
    batched = decoding.beam_search(toy_step, states, starts, **kw)
    for b in range(2):
        alone = decoding.beam_search(toy_step, states[b : b + 1], starts[b : b + 1], **kw)
        for got, want in zip(batched, alone, strict=True):
            np.testing.assert_allclose(got[b], want[0], rtol=1e-6)
    assert np.all(np.diff(np.asarray(batched.scores), axis=-1) <= 0)


def test_tile_beams_repeats_per_example():
    x = jnp.arange(6).reshape(3, 2)
    np.testing.assert_array_equal(decoding.tile_beams({"x": x}, 2)["x"], np.repeat(x, 2, axis=0))


def test_decoding_argument_errors():
    with pytest.raises(ValueError, match="beam_size must be a Python int >= 1"):
        decoding.beam_search(toy_step, jnp.array([1]), jnp.array([0]), beam_size=0, max_length=2)
    with pytest.raises(TypeError, match="max_length must be a Python int"):
        decoding.greedy_decode(toy_step, jnp.array([1]), jnp.array([0]), max_length=2.5)


# -- with the attentional decoder cell --------------------------------------------------------

B, TV, DM, E, H, VOCAB, T = 2, 5, 6, 3, 7, 11, 4
LENGTHS = np.array([5, 3])


@pytest.fixture(scope="module")
def decoder():
    """A tiny embed -> AttentionalDecoderCell -> Dense decoder as pure functions."""
    keys = jax.random.split(jax.random.key(1), 4)
    memory = jax.random.normal(keys[0], (B, TV, DM))
    mask = np.arange(TV) < LENGTHS[:, None]
    embed = jax.random.normal(keys[1], (VOCAB, E))
    w_out = jax.random.normal(keys[2], (H, VOCAB))
    cell = luong.AttentionalDecoderCell(
        nn.LSTMCell(H), luong.LuongAttention(score="general", mode="local-p", window=2)
    )
    carry = cell.initialize_carry(jax.random.key(0), (B, E), memory, mask)
    rnn = nn.RNN(cell)
    variables = random_variables(rnn.init, keys[3], jnp.zeros((B, T, E)), initial_carry=carry)
    cell_vars = {"params": variables["params"]["cell"]}

    def step_fn(carry, tokens):
        carry, h_tilde = cell.apply(cell_vars, carry, embed[tokens])
        return carry, h_tilde @ w_out

    @jax.jit
    def full_run(carry, tokens):
        return rnn.apply(variables, embed[tokens], initial_carry=carry) @ w_out

    return step_fn, full_run, carry, memory, mask


def test_teacher_forced_steps_equal_the_full_run(decoder):
    step_fn, full_run, carry, *_ = decoder
    tokens = jax.random.randint(jax.random.key(5), (B, T), 0, VOCAB)
    _, logits = jax.jit(lambda c, y: decoding.teacher_forced_logits(step_fn, c, y))(carry, tokens)
    np.testing.assert_allclose(logits, full_run(carry, tokens), atol=1e-5)


def test_greedy_is_consistent_with_teacher_forcing_and_beam_one(decoder):
    step_fn, full_run, carry, *_ = decoder
    start = jnp.array([1, 4])
    greedy = jax.jit(lambda c: decoding.greedy_decode(step_fn, c, start, max_length=T))(carry)
    inputs = jnp.concatenate([start[:, None], greedy.tokens[:, :-1]], axis=1)
    np.testing.assert_array_equal(jnp.argmax(full_run(carry, inputs), -1), greedy.tokens)
    beam = jax.jit(
        lambda c: decoding.beam_search(
            step_fn, c, start, beam_size=1, max_length=T, length_penalty=0.6
        )
    )(carry)
    np.testing.assert_array_equal(beam.tokens[:, 0], greedy.tokens)
    np.testing.assert_allclose(beam.log_probs[:, 0], greedy.log_probs, rtol=1e-5)
    wide = jax.jit(
        lambda c: decoding.beam_search(step_fn, c, start, beam_size=3, max_length=T, eos_id=0)
    )(carry)
    assert np.all(np.isfinite(wide.scores)) and np.all(np.diff(wide.scores, axis=-1) <= 0)


def test_tiled_carry_gives_each_beam_its_example(decoder):
    """Pitfall E4: repeat-tiled memory and mask reproduce the untiled logits per beam;
    memory tiled with jnp.tile next to a repeat-tiled mask does not."""
    step_fn, _, carry, memory, _ = decoder
    step_fn = jax.jit(step_fn)
    beams, tokens = 3, jnp.array([1, 4])
    _, logits = step_fn(carry, tokens)
    _, tiled = step_fn(decoding.tile_beams(carry, beams), jnp.repeat(tokens, beams))
    np.testing.assert_allclose(tiled, np.repeat(logits, beams, axis=0), atol=1e-6)
    wrong = decoding.tile_beams(carry, beams)._replace(memory=jnp.tile(memory, (beams, 1, 1)))
    _, mixed = step_fn(wrong, jnp.repeat(tokens, beams))
    assert not np.allclose(mixed, np.repeat(logits, beams, axis=0), atol=1e-3)
