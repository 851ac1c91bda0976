"""Decoding with any step function: teacher forcing, greedy decoding and beam search.

Everything here is a pure function of a *step function*

    ``step_fn(carry, tokens [batch]) -> (carry, logits [batch, vocab])``

that embeds the previous tokens, runs one decoder step (e.g. an
:class:`~luong_attention.luong.AttentionalDecoderCell`) and projects to the vocabulary; for a Flax
model that is a closure such as ``lambda c, y: model.apply(variables, c, y,
method=Model.step)``. The carry may be any pytree whose leaves have the batch as their
leading axis (the decoder's :class:`~luong_attention.luong.DecoderState` does: the memory and its
mask travel in it). All loops are ``jax.lax.scan``, so the functions run under ``jax.jit``
with ``max_length``, ``beam_size`` and the token ids static.

Token conventions: the outputs hold the *generated* tokens (not the start token); once a
sequence emits ``eos_id`` it is finished and the following positions hold ``pad_id``. A
sequence's length counts its tokens up to and including ``eos_id`` (``max_length`` if it
never ends).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Carry = Any
StepFn = Callable[[Carry, jax.Array], tuple[Carry, jax.Array]]


class GreedyOutput(NamedTuple):
    """The result of :func:`greedy_decode`.

    Attributes:
      tokens: int32 ``[batch, max_length]``.
      lengths: int32 ``[batch]``.
      log_probs: float32 ``[batch]``, the sum of the chosen tokens' log-probabilities.
    """

    tokens: jax.Array
    lengths: jax.Array
    log_probs: jax.Array


class BeamOutput(NamedTuple):
    """The result of :func:`beam_search`, best hypothesis first.

    Attributes:
      tokens: int32 ``[batch, beam_size, max_length]``.
      lengths: int32 ``[batch, beam_size]``.
      log_probs: float32 ``[batch, beam_size]``, the sum of the tokens' log-probabilities.
      scores: float32 ``[batch, beam_size]``, ``log_probs / lengths ** length_penalty``:
        the ranking. ``-inf`` marks a beam with no hypothesis (more beams than sequences).
    """

    tokens: jax.Array
    lengths: jax.Array
    log_probs: jax.Array
    scores: jax.Array


def tile_beams(tree: Any, beam_size: int) -> Any:
    """Repeats every leaf ``beam_size`` times along axis 0: ``[batch, ...] -> [batch *
    beam_size, ...]`` with the beams of one example next to each other (``jnp.repeat``, not
    ``jnp.tile``), so row ``b * beam_size + k`` is beam ``k`` of example ``b``.

    Tile the memory *and* its mask (and any lengths) together, e.g. by tiling the whole
    decoder carry: a mask tiled the other way round silently attends to the wrong example.
    """
    return jax.tree.map(lambda x: jnp.repeat(x, beam_size, axis=0), tree)


def teacher_forced_logits(
    step_fn: StepFn, carry: Carry, tokens: jax.Array
) -> tuple[Carry, jax.Array]:
    """Runs ``step_fn`` over given input tokens one step at a time (teacher forcing).

    Args:
      step_fn: ``(carry, tokens [batch]) -> (carry, logits [batch, vocab])``.
      carry: the initial carry.
      tokens: int ``[batch, length]``: the decoder inputs (start token, then the targets
        shifted right).

    Returns:
      ``(final_carry, logits [batch, length, vocab])``.
    """
    carry, logits = jax.lax.scan(step_fn, carry, jnp.swapaxes(jnp.asarray(tokens), 0, 1))
    return carry, jnp.swapaxes(logits, 0, 1)


def greedy_decode(
    step_fn: StepFn,
    carry: Carry,
    start_tokens: jax.Array,
    *,
    max_length: int,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> GreedyOutput:
    """Greedy decoding: feed back the most likely token at every step.

    Args:
      step_fn: ``(carry, tokens [batch]) -> (carry, logits [batch, vocab])``.
      carry: the initial carry (batch-leading leaves).
      start_tokens: int ``[batch]``, the first decoder inputs.
      max_length: number of steps.
      eos_id: the end-of-sequence token, or ``None`` to always run ``max_length`` steps.
      pad_id: written after ``eos_id`` (and fed back to ``step_fn`` there).

    Returns:
      :class:`GreedyOutput`.
    """
    max_length = _positive_int("max_length", max_length)
    start_tokens = jnp.asarray(start_tokens, jnp.int32)
    batch = start_tokens.shape[0]

    def body(state, _):
        carry, last, finished, log_probs, lengths = state
        carry, logits = step_fn(carry, last)
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        token = jnp.argmax(log_p, axis=-1).astype(jnp.int32)
        chosen = jnp.take_along_axis(log_p, token[:, None], axis=-1)[:, 0]
        token = jnp.where(finished, pad_id, token)
        log_probs = log_probs + jnp.where(finished, 0.0, chosen)
        lengths = lengths + (~finished).astype(jnp.int32)
        if eos_id is not None:
            finished = finished | (token == eos_id)
        return (carry, token, finished, log_probs, lengths), token

    init = (
        carry,
        start_tokens,
        jnp.zeros((batch,), bool),
        jnp.zeros((batch,), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
    )
    (_, _, _, log_probs, lengths), tokens = jax.lax.scan(body, init, None, length=max_length)
    return GreedyOutput(jnp.swapaxes(tokens, 0, 1), lengths, log_probs)


def normalised_scores(log_probs: jax.Array, lengths: jax.Array, alpha: float) -> jax.Array:
    """Length normalisation ``log_probs / max(lengths, 1) ** alpha`` (``alpha = 0``: none)."""
    if alpha == 0.0:
        return log_probs
    return log_probs / jnp.maximum(lengths, 1).astype(log_probs.dtype) ** alpha


def beam_search(
    step_fn: StepFn,
    carry: Carry,
    start_tokens: jax.Array,
    *,
    beam_size: int,
    max_length: int,
    eos_id: int | None = None,
    pad_id: int = 0,
    length_penalty: float = 1.0,
) -> BeamOutput:
    """Beam search with length normalisation.

    The carry is tiled per beam with :func:`tile_beams` (so the memory and its mask stay
    with their example), ``step_fn`` runs on ``batch * beam_size`` rows, and at every step
    the ``beam_size`` best continuations of each example are kept, ranked by
    ``log_prob / length ** length_penalty``. A finished hypothesis (one that emitted
    ``eos_id``) stays in the beam with its score frozen and competes with the live ones.
    With ``beam_size=1`` this is exactly :func:`greedy_decode` (all live candidates have the
    same length, so the ranking is the argmax).

    Args:
      step_fn: ``(carry, tokens [rows]) -> (carry, logits [rows, vocab])``.
      carry: the initial carry for ``batch`` rows (untiled).
      start_tokens: int ``[batch]``.
      beam_size: number of hypotheses kept per example.
      max_length: number of steps.
      eos_id: end-of-sequence token or ``None``.
      pad_id: written after ``eos_id``.
      length_penalty: the exponent ``alpha`` of the length normalisation; 0 ranks by the
        raw log-probability.

    Returns:
      :class:`BeamOutput`, best first.
    """
    beam_size = _positive_int("beam_size", beam_size)
    max_length = _positive_int("max_length", max_length)
    start_tokens = jnp.asarray(start_tokens, jnp.int32)
    batch = start_tokens.shape[0]
    rows = jnp.arange(batch)[:, None]
    alpha = float(length_penalty)

    def body(state, step):
        carry, last, tokens, finished, log_probs, lengths, _ = state
        carry, logits = step_fn(carry, last)
        vocab = logits.shape[-1]
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        log_p = log_p.reshape(batch, beam_size, vocab)
        # A finished hypothesis continues with pad_id only, at no cost and no extra length.
        frozen = jnp.where(jnp.arange(vocab) == pad_id, 0.0, -jnp.inf)
        log_p = jnp.where(finished[..., None], frozen, log_p)
        cand_log_probs = (log_probs[..., None] + log_p).reshape(batch, -1)
        cand_lengths = lengths + (~finished).astype(jnp.int32)
        cand_lengths = jnp.broadcast_to(cand_lengths[..., None], log_p.shape).reshape(batch, -1)
        cand_scores = normalised_scores(cand_log_probs, cand_lengths, alpha)
        scores, best = jax.lax.top_k(cand_scores, beam_size)  # [batch, beam]
        source, token = best // vocab, (best % vocab).astype(jnp.int32)
        was_finished = finished[rows, source]  # their only finite continuation is pad_id
        tokens = tokens[rows, source].at[:, :, step].set(token)
        finished = was_finished if eos_id is None else was_finished | (token == eos_id)
        log_probs = cand_log_probs[rows, best]
        lengths = cand_lengths[rows, best]
        flat_source = (rows * beam_size + source).reshape(-1)
        carry = jax.tree.map(lambda x: x[flat_source], carry)
        return (carry, token.reshape(-1), tokens, finished, log_probs, lengths, scores), None

    # Only beam 0 is live at the start, so the first step does not pick one token k times.
    first = jnp.where(jnp.arange(beam_size) == 0, 0.0, -jnp.inf)
    init = (
        tile_beams(carry, beam_size),
        jnp.repeat(start_tokens, beam_size),
        jnp.full((batch, beam_size, max_length), pad_id, jnp.int32),
        jnp.zeros((batch, beam_size), bool),
        jnp.broadcast_to(first, (batch, beam_size)).astype(jnp.float32),
        jnp.zeros((batch, beam_size), jnp.int32),
        jnp.zeros((batch, beam_size), jnp.float32),
    )
    state, _ = jax.lax.scan(body, init, jnp.arange(max_length))
    _, _, tokens, _, log_probs, lengths, scores = state
    return BeamOutput(tokens, lengths, log_probs, scores)


def _positive_int(name: str, value: Any) -> int:
    """``value`` as a Python int >= 1 (static under jit), or a ``ValueError``."""
    try:
        value = operator.index(value)
    except TypeError as err:
        raise TypeError(f"{name} must be a Python int >= 1. Received: {name}={value!r}") from err
    if value < 1:
        raise ValueError(f"{name} must be a Python int >= 1. Received: {name}={value!r}")
    return value
