"""``luong-attention bench-parallel``: time and per-device memory against the number of devices.

For each device count ``n`` a child process starts JAX with ``n`` devices (``n`` forced host
devices on CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=n``), splits the keys of one
long sequence over them with :func:`sequence_parallel_attention` and reports:

* ``device MiB``: XLA's own count of one device's buffers in the compiled forward+grad program
  (``memory_analysis()``: arguments + outputs + temporaries, per device, as every device runs
  the same program);
* ``process RSS MiB``: the child's peak resident memory growth during its first compiled
  forward+grad call (Linux ``/proc``). Forced
  host devices all live in that one process, so this is the total over all ``n`` devices;
* the median wall time of the forward call and of the forward+grad call.

Forced host devices share the machine's CPU cores, so their times show the cost of splitting
and merging, not a speed-up; on separate accelerators each device does ``1/n`` of the work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

MIB = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the benchmark's flags."""
    parser.add_argument("--length", type=int, default=8192, help="Tq = Tv")
    parser.add_argument("--depth", type=int, default=64, help="query/key/value depth")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--score-mode", choices=["dot", "concat"], default="dot")
    parser.add_argument("--value-mask", action="store_true", help="mask the last tenth of the keys")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    parser.add_argument("--quick", action="store_true", help="length 2048, 1 repeat")
    parser.add_argument("--json", type=str, default=None, help="also write the rows here")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)


def _timed(fn, args, repeats: int) -> float:
    """Median wall seconds of ``fn(*args)`` over ``repeats`` calls (after one warm-up)."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _rss_growth(fn, args) -> int:
    """Peak resident memory growth of this process during ``fn(*args)``, in bytes.

    Resets the kernel's peak mark first (``/proc/self/clear_refs``), so compilation and earlier
    calls do not hide the call's own peak.
    """
    import jax

    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _status_bytes("VmRSS")
    jax.block_until_ready(fn(*args))
    return _status_bytes("VmHWM") - before


def measure(
    devices: int, length: int, depth: int, score_mode: str, repeats: int, value_mask: bool
) -> dict:
    """One row of the table, measured in this process on its first ``devices`` devices."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh

    from luong_attention import sequence_parallel_attention

    mesh = Mesh(np.array(jax.devices()[:devices]), ("sp",))
    rng = np.random.default_rng(0)
    query, key, value = (
        jnp.asarray(rng.normal(size=(1, length, depth)).astype(np.float32)) for _ in range(3)
    )

    mask = jnp.arange(length) < length - length // 10 if value_mask else None

    def forward(query, key, value):
        return sequence_parallel_attention(
            query,
            value,
            key,
            mesh=mesh,
            axis_name="sp",
            value_mask=mask,
            use_causal_mask=True,
            score_mode=score_mode,
        )

    def loss(query, key, value):
        return jnp.sum(forward(query, key, value))

    forward_fn = jax.jit(forward)
    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    compiled = grad_fn.lower(query, key, value).compile()
    analysis = compiled.memory_analysis()
    device_bytes = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    rss_growth = _rss_growth(compiled, (query, key, value))
    return {
        "devices": devices,
        "length": length,
        "depth": depth,
        "score_mode": score_mode,
        "value_mask": value_mask,
        "device_mib": device_bytes / MIB,
        "process_rss_mib": rss_growth / MIB,
        "forward_ms": 1e3 * _timed(forward_fn, (query, key, value), repeats),
        "grad_ms": 1e3 * _timed(compiled, (query, key, value), repeats),
    }


def _run_child(devices: int, args: argparse.Namespace) -> dict:
    """Measures one device count in a fresh process started with that many devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.setdefault("JAX_PLATFORMS", "cpu")
    command = [
        sys.executable,
        "-m",
        "luong_attention.tools.bench_parallel",
        "--child",
        str(devices),
    ]
    command += ["--length", str(args.length), "--depth", str(args.depth)]
    command += ["--score-mode", args.score_mode, "--repeats", str(args.repeats)]
    command += ["--value-mask"] if args.value_mask else []
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {devices}-device child failed:\n{done.stdout}{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| devices | device MiB (XLA, fwd+grad) | process RSS growth MiB | forward ms | "
        "fwd+grad ms |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['devices']} | {row['device_mib']:.1f} | {row['process_rss_mib']:.1f} | "
            f"{row['forward_ms']:.1f} | {row['grad_ms']:.1f} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    """Measures every device count in its own child process and prints the table."""
    if args.quick:
        args.length, args.repeats = 2048, 1
    if args.child is not None:
        row = measure(
            args.child, args.length, args.depth, args.score_mode, args.repeats, args.value_mask
        )
        print(json.dumps(row))
        return
    masked = ", last tenth of the keys masked" if args.value_mask else ""
    print(
        f"sequence-parallel {args.score_mode} attention, causal{masked}, batch 1, "
        f"Tq = Tv = {args.length}, depth {args.depth}, float32"
    )
    rows = []
    for devices in args.devices:
        rows.append(_run_child(devices, args))
        print(f"  {devices} device(s) done", file=sys.stderr)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=2)


def main() -> None:
    """Entry point of ``python -m luong_attention.tools.bench_parallel``."""
    parser = argparse.ArgumentParser(prog="luong-attention bench-parallel", description=__doc__)
    add_arguments(parser)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
