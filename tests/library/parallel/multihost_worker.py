"""One process of the two-process ``jax.distributed`` run in tests/library/parallel/test_parallel.py.

Usage: ``python tests/library/parallel/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR``, with
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` and ``JAX_PLATFORMS=cpu`` set by the
parent. Every process builds the same inputs from a seed, joins the others over 127.0.0.1 (CPU
collectives via gloo), runs sequence-parallel attention (both strategies) and its gradients on a mesh
of all processes' devices, and saves the gathered results to ``OUT_DIR/process_<id>.npz``.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from luong_attention import parallel as lap

# Shapes: batch 2, Tq 5, Tv 11 (uneven over 4 devices), depth 3, value depth 4.
SHAPES = {"query": (2, 5, 3), "key": (2, 11, 3), "value": (2, 11, 4)}
# (strategy, score_mode) pairs run across the processes.
RUNS = (("replicated", "dot"), ("replicated", "concat"), ("ring", "dot"))


def inputs() -> dict[str, np.ndarray]:
    """The same inputs in every process (and in the single-process reference)."""
    rng = np.random.default_rng(7)
    arrays = {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}
    value_mask = rng.random((2, 11)) > 0.3
    value_mask[0] = False  # a fully masked batch row
    arrays["value_mask"] = value_mask
    arrays["cotangent"] = rng.normal(size=(2, 5, 4)).astype(np.float32)
    return arrays


def loss(attention_fn, score_mode: str):
    """``sum(out * cotangent)`` of a causal, masked call, with ``out`` as auxiliary output."""

    def fn(query, key, value, scale, value_mask, cotangent):
        out = attention_fn(
            query,
            value,
            key,
            value_mask=value_mask,
            use_causal_mask=True,
            score_mode=score_mode,
            scale=scale,
        )
        return jnp.sum(out * cotangent), out

    return fn


def main(process_id: int, num_processes: int, port: int, out_dir: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    mesh = Mesh(np.array(jax.devices()), ("sp",))
    replicated = NamedSharding(mesh, P())
    arrays = {
        name: jax.make_array_from_callback(x.shape, replicated, lambda index, x=x: x[index])
        for name, x in inputs().items()
    }
    results = {"devices": np.array(jax.device_count())}

    for strategy, score_mode in RUNS:

        def parallel(*args, strategy=strategy, **kwargs):
            return lap.sequence_parallel_attention(
                *args, mesh=mesh, axis_name="sp", strategy=strategy, **kwargs
            )

        loss_fn = loss(parallel, score_mode)
        grad_fn = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2, 3), has_aux=True))
        grads, out = grad_fn(
            arrays["query"],
            arrays["key"],
            arrays["value"],
            np.float32(0.7),
            arrays["value_mask"],
            arrays["cotangent"],
        )
        gathered = multihost_utils.process_allgather((out, *grads), tiled=True)
        for name, x in zip(("out", "query", "key", "value", "scale"), gathered, strict=True):
            results[f"{strategy}_{score_mode}_{name}"] = np.asarray(x)
    np.savez(f"{out_dir}/process_{process_id}.npz", **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
