"""A linear map with a hand-written transpose: forward mode through hand-written backwards.

JAX gives a ``jax.custom_vjp`` function no forward mode, and a ``jax.custom_jvp`` function
gets its reverse mode by transposing the tangent computation, which for a tiled kernel would
save every tile's weights (memory ``Tq * Tv``) and cannot pass loops with traced bounds. So
the kernels' rules are ``custom_jvp`` rules whose tangent is :func:`linear_call`: one
primitive that evaluates a fast tangent pass (``apply``), transposes to the kernel's own
backward (``transpose``, and back again), and whose derivatives with respect to its
non-linear inputs (second order: Hessians, gradients of gradients) go through
``reference`` / ``transpose_reference``, the same maths written so that JAX can
differentiate it in every mode (static loop bounds).

Under ``vmap`` the primitive records the batched axes of each level and runs its functions
under the same ``vmap`` (with the axis name, so collectives inside still see it, and the
``spmd_axis_name``), which
keeps every per-example detail of the kernels (dropout streams, per-example weights) as
the unbatched call computes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir


class Linear(NamedTuple):
    """A map linear in its second argument, with its transpose (static, hashable by identity).

    Attributes:
      apply: ``(res, lin) -> out``, linear in ``lin``; ``res`` holds the non-linear inputs.
      transpose: ``(res, ct) -> lin``, the transpose of ``apply`` in its second argument.
      reference: ``apply``'s maths in a form JAX differentiates in every mode.
      transpose_reference: ``transpose``'s, likewise.
    """

    apply: Callable[[Any, Any], Any]
    transpose: Callable[[Any, Any], Any]
    reference: Callable[[Any, Any], Any]
    transpose_reference: Callable[[Any, Any], Any]

    def transposed(self) -> Linear:
        """The map ``ct -> lin`` with ``apply`` as its transpose."""
        return Linear(self.transpose, self.apply, self.transpose_reference, self.reference)


class _Level(NamedTuple):
    """One ``vmap`` around the call: which leaves carry its axis (``0``) and which do not
    (``None``); an output with ``None`` is summed over the axis (a transposed broadcast)."""

    name: Any
    size: int
    spmd: Any
    res: tuple[int | None, ...]
    lin: tuple[int | None, ...]
    out: tuple[int | None, ...]

    def transposed(self) -> _Level:
        return _Level(self.name, self.size, self.spmd, self.res, self.out, self.lin)


linear_p = jex_core.Primitive("luong_linear")
linear_p.multiple_results = True


def linear_call(fn: Linear, res: Any, lin: Any) -> Any:
    """``fn.apply(res, lin)`` as one primitive (see the module docstring).

    Args:
      fn: the map and its transpose.
      res: pytree of non-linear inputs (any dtypes).
      lin: pytree of floating inputs in which the map is linear.

    Returns:
      The pytree ``fn.apply(res, lin)`` returns.
    """
    res_leaves, res_tree = jax.tree.flatten(res)
    lin_leaves, lin_tree = jax.tree.flatten(lin)
    jaxpr, shape = jax.make_jaxpr(fn.apply, return_shape=True)(res, lin)
    out_avals, out_tree = jax.tree.flatten(shape)
    outs = linear_p.bind(
        *res_leaves,
        *lin_leaves,
        fn=fn,
        trees=(res_tree, lin_tree, out_tree),
        avals=(_avals(lin_leaves), _avals(out_avals)),
        levels=(),
        effect_set=frozenset(jaxpr.effects),
    )
    return jax.tree.unflatten(out_tree, outs)


def _avals(leaves) -> tuple[jax.core.ShapedArray, ...]:
    return tuple(jax.core.ShapedArray(x.shape, x.dtype) for x in leaves)


def _run(which: str, args, *, fn, trees, avals, levels, effect_set=None) -> list[jax.Array]:
    """Evaluates ``fn.<which>`` on the flat ``args`` under the recorded ``vmap`` levels."""
    res_tree, lin_tree, _ = trees
    n_res = res_tree.num_leaves

    def base(res, lin):
        out = getattr(fn, which)(
            jax.tree.unflatten(res_tree, res), jax.tree.unflatten(lin_tree, lin)
        )
        return jax.tree.leaves(out)

    def under(depth: int, res, lin):
        if depth == 0:
            return base(res, lin)
        level = levels[depth - 1]
        outs = jax.vmap(
            lambda r, x: under(depth - 1, r, x),
            in_axes=(list(level.res), list(level.lin)),
            axis_name=level.name,
            axis_size=level.size,
            spmd_axis_name=level.spmd,
        )(res, lin)
        return [o if axis == 0 else o.sum(0) for o, axis in zip(outs, level.out, strict=True)]

    return under(len(levels), list(args[:n_res]), list(args[n_res:]))


def _impl(*args, **params) -> list[jax.Array]:
    return _run("apply", args, **params)


def _abstract_eval(*args, fn, trees, avals, levels, effect_set):
    return list(avals[1]), effect_set


def _transposed_params(res, fn, trees, avals, levels) -> dict:
    """The params of the transposed call; its effects are found by tracing it on ``res``."""
    res_tree, lin_tree, out_tree = trees
    params = dict(
        fn=fn.transposed(),
        trees=(res_tree, out_tree, lin_tree),
        avals=(avals[1], avals[0]),
        levels=tuple(level.transposed() for level in levels),
    )
    jaxpr = jax.make_jaxpr(lambda *a: _run("apply", a, **params))(*res, *params["avals"][0])
    return dict(params, effect_set=frozenset(jaxpr.effects))


def _float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


def _jvp(primals, tangents, **params):
    """Linear in ``lin``: the call on the tangents of ``lin``. When the residuals move too
    (second order), the whole call goes through ``jax.jvp`` of the reference, in one pass
    for the primal and both tangent terms."""
    n_res = params["trees"][0].num_leaves
    res = primals[:n_res]
    moving = [i for i, t in enumerate(tangents) if type(t) is not ad.Zero and _float(primals[i])]
    if not any(i < n_res for i in moving):
        outs = linear_p.bind(*primals, **params)
        if not moving:
            return outs, [ad.Zero(jax.core.get_aval(o).to_tangent_aval()) for o in outs]
        lin_tangents = map(ad.instantiate_zeros, tangents[n_res:])
        return outs, linear_p.bind(*res, *lin_tangents, **params)

    def reference(*moved):
        args = list(primals)
        for i, x in zip(moving, moved, strict=True):
            args[i] = x
        return _run("reference", args, **params)

    return jax.jvp(reference, [primals[i] for i in moving], [tangents[i] for i in moving])


def _transpose(cts, *args, fn, trees, avals, levels, effect_set):
    n_res = trees[0].num_leaves
    res, lin = args[:n_res], args[n_res:]
    if any(ad.is_undefined_primal(x) for x in res):
        raise ValueError("linear_call is not linear in its residual inputs")
    cts = [
        jnp.zeros(a.shape, a.dtype) if type(ct) is ad.Zero else ct
        for ct, a in zip(cts, avals[1], strict=True)
    ]
    lin_cts = linear_p.bind(*res, *cts, **_transposed_params(res, fn, trees, avals, levels))
    return [None] * n_res + [
        ct if ad.is_undefined_primal(x) else None for ct, x in zip(lin_cts, lin, strict=True)
    ]


def _batch(axis_data, args, dims, *, fn, trees, avals, levels, effect_set):
    if all(d is None for d in dims):
        outs = linear_p.bind(
            *args, fn=fn, trees=trees, avals=avals, levels=levels, effect_set=effect_set
        )
        return outs, [None] * len(outs)
    n_res = trees[0].num_leaves
    args = [x if d is None else jnp.moveaxis(x, d, 0) for x, d in zip(args, dims, strict=True)]
    axes = tuple(None if d is None else 0 for d in dims)
    lin_avals, out_avals = avals
    level = _Level(
        axis_data.name,
        axis_data.size,
        axis_data.spmd_name,
        axes[:n_res],
        axes[n_res:],
        (0,) * len(out_avals),
    )

    def grow(aval, axis=0):
        return aval if axis is None else aval.update(shape=(axis_data.size, *aval.shape))

    new_avals = (
        tuple(grow(a, axis) for a, axis in zip(lin_avals, level.lin, strict=True)),
        tuple(grow(a) for a in out_avals),
    )
    outs = linear_p.bind(
        *args, fn=fn, trees=trees, avals=new_avals, levels=(*levels, level), effect_set=effect_set
    )
    return outs, [0] * len(outs)


linear_p.def_impl(_impl)
linear_p.def_effectful_abstract_eval(_abstract_eval)
ad.primitive_jvps[linear_p] = _jvp
ad.primitive_transposes[linear_p] = _transpose
batching.fancy_primitive_batchers[linear_p] = _batch
mlir.register_lowering(linear_p, mlir.lower_fun(_impl, multiple_results=True))
