"""The kernel interface: what every attention kernel implements and every caller uses.

A kernel computes Keras's attention (scores, ``score - MASK_PENALTY`` at masked keys, a
float32 softmax, the weighted sum of the values) for one block of queries against one block
of keys, without building the ``[Tq, Tv]`` scores. Its callers (:func:`attention_with_lse`,
the sequence-parallel strategies) see it only through this module:

* :class:`TileConfig`: the static settings of one call, made by ``Kernel.config``;
* :class:`Operands`: the arrays of one call, in the natural ``[B, T, ...]`` layout (batch
  dims flattened, ``scale`` folded in: :meth:`ScoreParams.fold`);
* :class:`SoftmaxState`: the online-softmax state, running max, denominator and
  (unnormalised) accumulator in float32, ``[B, Tq]``, ``[B, Tq]``, ``[B, Tq, dim_v]``, with
  :func:`merge`, :func:`finalise` and :func:`logsumexp`;
* :class:`Kernel`: ``config``, ``forward`` (operands to a state), ``backward`` (gradients from
  the saved :class:`RowStats`), ``tangent`` (forward-mode tangents from them),
  ``schedule`` (which tiles a call visits) and ``dropout_multiplier`` (the dropout mask a
  call draws, as one dense array);
* :func:`attend`: any kernel as one function JAX differentiates in every mode, to any order.

A kernel's own layout (the blocked kernel stores its tiles block-major) stays its business.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from luong_attention._src.primitives.linear import Linear, linear_call
from luong_attention._src.primitives.scores import ScoreMode


class TileConfig(NamedTuple):
    """Static (hashable) settings of one kernel call.

    Attributes:
      score_mode: ``"dot"`` or ``"concat"``.
      causal: query ``q_offset + i`` sees key ``kv_offset + j`` only if ``kv_offset + j <=
        q_offset + i``.
      block_q: queries per tile.
      block_kv: keys per tile.
      q_length: Tq of the call.
      kv_length: Tv of the call.
      dropout_rate: fraction of the weights dropped, in ``[0, 1)``.
      every_tile: visit every tile with static loop bounds (no skipped tiles): slower
        under masks, but JAX differentiates it in reverse mode (second-order derivatives).
    """

    score_mode: ScoreMode
    causal: bool
    block_q: int
    block_kv: int
    q_length: int
    kv_length: int
    dropout_rate: float
    every_tile: bool = False

    @property
    def n_q(self) -> int:
        """Number of query tiles."""
        return -(-self.q_length // self.block_q)

    @property
    def n_kv(self) -> int:
        """Number of key tiles."""
        return -(-self.kv_length // self.block_kv)


class Operands(NamedTuple):
    """The arrays of one kernel call (a pytree).

    Attributes:
      q: ``[B, Tq, depth]`` in the matmul operand dtype, ``scale`` folded in.
      k: ``[B, Tv, depth]`` (times ``scale`` for ``"concat"``).
      v: ``[B, Tv, dim_v]``.
      weight: ``concat_score_weight`` in the statistics dtype (0, unused, for ``"dot"``).
      value_mask: bool ``[B or 1, Tv]`` or ``None``; masked keys get ``score - 1e9``.
      offsets: int32 ``(q_offset, kv_offset)``, the global positions of the first query and
        key (for the causal mask).
      rng: the dropout key, or ``None`` without dropout.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    weight: jax.Array
    value_mask: jax.Array | None
    offsets: tuple[jax.Array, jax.Array]
    rng: jax.Array | None


class SoftmaxState(NamedTuple):
    """The online-softmax state of rows over the keys seen so far (float32 or wider).

    Attributes:
      m: ``[B, rows]`` running max of the (masked) scores; ``-inf`` for a row that saw none.
      denom: ``[B, rows]``, ``sum exp(score - m)``.
      acc: ``[B, rows, dim_v]``, ``sum exp(score - m) * value`` (not normalised).

    Max and denominator are kept apart: in a fully masked row ``m`` is about ``-1e9``, where
    float32 could not hold ``m + log(denom)`` to better than 64.
    """

    m: jax.Array
    denom: jax.Array
    acc: jax.Array


class RowStats(NamedTuple):
    """What a backward pass recomputes the weights from: ``out`` ``[B, Tq, dim_v]`` (the
    normalised output) and the final ``m`` and ``denom`` ``[B, Tq]`` of each row."""

    out: jax.Array
    m: jax.Array
    denom: jax.Array


class Schedule(NamedTuple):
    """Which tiles a call visits.

    Query tile ``i`` visits key tiles ``[0, kv_stop[i])``; key tile ``j`` is visited by query
    tiles ``[0, min(n_full, q_start[j]))`` and ``[q_start[j], n_q)``. ``n_full`` counts the
    leading query tiles holding a fully masked row, which must see every key.

    Attributes:
      kv_stop: int ``[n_q]``.
      q_start: int ``[n_kv]``.
      n_full: int scalar.
    """

    kv_stop: jax.Array
    q_start: jax.Array
    n_full: jax.Array


class Kernel(NamedTuple):
    """One attention kernel: the functions its callers use (hashable, a static argument).

    Attributes:
      name: the kernel's name.
      config: ``(score_mode, q_length, kv_length, depth, *, causal, dropout_rate, block_q,
        block_kv, batch) -> TileConfig``, the kernel's tiles for a problem (``None`` blocks:
        its defaults).
      forward: ``(TileConfig, Operands) -> SoftmaxState`` over the call's keys.
      backward: ``(TileConfig, Operands, RowStats, d_out [B, Tq, dim_v], d_lse [B, Tq]) ->
        (dq, dk, dv, dweight)``: the pull-back of ``(out, lse)`` with the rows' final
        statistics (which may include keys of other calls, as in ring attention). ``dq``,
        ``dk``, ``dv`` come in the operands' dtypes, ``dweight`` in the statistics dtype.
      schedule: ``(TileConfig, value_mask, offsets) -> Schedule``.
      dropout_multiplier: ``(TileConfig, rng, batch) -> [B, Tq, Tv]``, ``keep / (1 - rate)``
        as the forward draws it.
      tangent: ``(TileConfig, Operands, RowStats, (dq, dk, dv, dweight)) -> (d_out [B, Tq,
        dim_v], d_lse [B, Tq])``: the push-forward of tangents of the operands, with the
        rows' final statistics (linear in the tangents; ``backward`` is its transpose).
      differentiable: the same maths and dropout mask in code JAX differentiates in every
        mode (with ``TileConfig.every_tile``), for derivatives of ``tangent`` and
        ``backward``; ``None`` when this kernel is such code.
    """

    name: str
    config: Callable[..., TileConfig]
    forward: Callable[[TileConfig, Operands], SoftmaxState]
    backward: Callable[..., tuple[jax.Array, jax.Array, jax.Array, jax.Array]]
    schedule: Callable[..., Schedule]
    dropout_multiplier: Callable[[TileConfig, jax.Array, int], jax.Array]
    tangent: Callable[..., tuple[jax.Array, jax.Array]]
    differentiable: Kernel | None = None


def empty_state(batch: int, rows: int, value_depth: int, dtype: jnp.dtype) -> SoftmaxState:
    """The state of rows that saw no key: ``m = -inf``, zero denominator and accumulator."""
    return SoftmaxState(
        jnp.full((batch, rows), -jnp.inf, dtype),
        jnp.zeros((batch, rows), dtype),
        jnp.zeros((batch, rows, value_depth), dtype),
    )


def merge(a: SoftmaxState, b: SoftmaxState) -> SoftmaxState:
    """The state over the union of two disjoint key sets (associative, commutative).

    A side that saw no key (``m = -inf``) gets weight 0, and no NaN when neither did.
    """
    m = jnp.maximum(a.m, b.m)
    a, b = rescale(a, m), rescale(b, m)
    return SoftmaxState(m, a.denom + b.denom, a.acc + b.acc)


def rescale(state: SoftmaxState, m: jax.Array) -> SoftmaxState:
    """``state`` relative to a running max ``m >= state.m`` (``[B, rows]``): its denominator
    and accumulator times ``exp(state.m - m)``; weight 0, and no NaN, where ``m`` is ``-inf``."""
    w = jnp.exp(state.m - jnp.where(jnp.isneginf(m), 0.0, m))
    return SoftmaxState(m, w * state.denom, w[..., None] * state.acc)


def finalise(state: SoftmaxState) -> jax.Array:
    """The normalised output ``[B, rows, dim_v]`` (0 in a row that saw no key)."""
    return state.acc / jnp.where(state.denom > 0, state.denom, 1.0)[..., None]


def logsumexp(state: SoftmaxState) -> jax.Array:
    """``[B, rows]``: the log of each row's softmax denominator, ``m + log(denom)``."""
    return state.m + jnp.log(state.denom)


def attend(kernel: Kernel, cfg: TileConfig, ops: Operands) -> tuple[jax.Array, jax.Array]:
    """``(out [B, Tq, dim_v], lse [B, Tq])`` of one kernel call, in the statistics dtype.

    Differentiable in ``q``, ``k``, ``v`` and ``weight`` through both outputs, in every
    mode and to any order (see :func:`attend_rows`).
    """
    stats = attend_rows(kernel, cfg, ops)
    return stats.out, stats.m + jnp.log(stats.denom)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def attend_rows(kernel: Kernel, cfg: TileConfig, ops: Operands) -> RowStats:
    """The output and final row statistics of one kernel call (``kernel.forward``).

    Forward mode runs ``kernel.tangent`` after the forward; reverse mode transposes it into
    ``kernel.backward``, from the saved :class:`RowStats` (memory linear in the lengths
    either way). Second-order derivatives differentiate ``kernel.differentiable`` with
    every tile visited. The tangent of ``m`` is that of the logsumexp, ``denom``'s is 0.
    """
    state = kernel.forward(cfg, ops)
    return RowStats(finalise(state), state.m, state.denom)


@attend_rows.defjvp
def _attend_rows_jvp(kernel: Kernel, cfg: TileConfig, primals, tangents):
    (ops,), (d_ops,) = primals, tangents
    stats = attend_rows(kernel, cfg, ops)
    passes = (
        functools.partial(_kernel_tangent, kernel, cfg),
        functools.partial(_kernel_backward, kernel, cfg),
    )
    return stats, rows_tangent(*passes, (ops, stats), tuple(d_ops[:4]), stats)


def exact_kernel(kernel: Kernel, cfg: TileConfig) -> tuple[Kernel, TileConfig]:
    """The kernel's maths in code JAX differentiates in every mode, every tile visited: what
    derivatives of its tangent and backward passes differentiate."""
    return kernel.differentiable or kernel, cfg._replace(every_tile=True)


def _kernel_tangent(kernel: Kernel, cfg: TileConfig, exact: bool, res, d_ops):
    kernel, cfg = exact_kernel(kernel, cfg) if exact else (kernel, cfg)
    return kernel.tangent(cfg, *res, d_ops)


def _kernel_backward(kernel: Kernel, cfg: TileConfig, exact: bool, res, cts):
    kernel, cfg = exact_kernel(kernel, cfg) if exact else (kernel, cfg)
    return kernel.backward(cfg, *res, *cts)


def rows_tangent(
    tangent: Callable[..., tuple[jax.Array, jax.Array]],
    backward: Callable[..., tuple],
    residuals,
    d_ops: tuple,
    stats: RowStats,
) -> RowStats:
    """The tangent of rows' :class:`RowStats` (a ``custom_jvp`` rule's tangent output).

    One :func:`~luong_attention._src.primitives.linear.linear_call`: ``tangent(exact,
    residuals, d_ops) -> (d_out, d_lse)`` evaluated, transposed into ``backward(exact,
    residuals, (d_out, d_lse) cotangents) -> d_ops`` cotangents, both differentiated with
    ``exact=True``. ``m`` carries the logsumexp's tangent and ``denom`` none: every use of
    the statistics goes through ``m + log(denom)``.
    """
    linear = Linear(
        apply=functools.partial(tangent, False),
        transpose=functools.partial(backward, False),
        reference=functools.partial(tangent, True),
        transpose_reference=functools.partial(backward, True),
    )
    d_out, d_lse = linear_call(linear, residuals, d_ops)
    return RowStats(d_out, d_lse, jnp.zeros_like(stats.denom))
