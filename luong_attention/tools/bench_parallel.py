"""``luong-attention bench-parallel``: per-device memory, communication and time against devices.

For each strategy and device count ``n`` a child process starts JAX with ``n`` devices (``n``
forced host devices on CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=n``), splits one
long sequence over them with :func:`sequence_parallel_attention` (query, key and value given
split along the sequence) and reports:

* ``device MiB``: XLA's own count of one device's buffers in the compiled forward+grad program
  (``memory_analysis()``: arguments + outputs + temporaries, per device, as every device runs
  the same program), and its ratio to the same strategy on one device;
* the bytes each device sends per ring step, read from the compiled HLO (the
  ``collective-permute`` ops inside loops, forward and backward apart), next to the ring
  formula ``B * (T / n) * (depth + value_depth) * 4`` per step forward (K and V) and twice that
  backward (K, V, dK, dV); and the bytes of the other collectives (``all-reduce``,
  ``all-gather``), run once per call;
* unless ``--memory-only``: the child's peak resident memory growth during its first compiled
  forward+grad call (Linux ``/proc``; forced host devices all live in that one process, so this
  is the total over all ``n`` devices) and the median wall time of the forward call and of the
  forward+grad call.

``--memory-only`` compiles without running (inputs are abstract ``ShapeDtypeStruct``s), which is
how ``--length 1048576`` is checked. ``--balance`` prints the causal score work of each device
under the contiguous and zigzag ring layouts (:func:`ring_score_work`).

Forced host devices share the machine's CPU cores, so their times show the cost of splitting
and merging, not a speed-up; on separate accelerators each device does ``1/n`` of the work.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from luong_attention.date_demo import arguments

MIB = 2**20
STRATEGIES = {
    "replicated": ("replicated", "contiguous"),
    "ring": ("ring", "contiguous"),
    "ring-zigzag": ("ring", "zigzag"),
}
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4}
DTYPE_BYTES |= {"f64": 8, "s64": 8, "u64": 8}
_COLLECTIVE = re.compile(
    r"=\s*(.*?)\s(collective-permute|all-reduce|all-gather|all-to-all|reduce-scatter)"
    r"(?:-start)?\("
)
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the benchmark's flags."""
    parser.add_argument("--length", type=arguments.positive_int, default=8192, help="Tq = Tv")
    parser.add_argument(
        "--depth", type=arguments.positive_int, default=64, help="query/key/value depth"
    )
    parser.add_argument("--devices", type=arguments.positive_int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES)
    )
    parser.add_argument(
        "--memory-only", action="store_true", help="compile only: memory and communication"
    )
    parser.add_argument(
        "--balance", action="store_true", help="also print the causal work per device"
    )
    parser.add_argument("--score-mode", choices=["dot", "concat"], default="dot")
    parser.add_argument("--value-mask", action="store_true", help="mask the last tenth of the keys")
    parser.add_argument(
        "--repeats", type=arguments.positive_int, default=3, help="timed calls per measurement"
    )
    parser.add_argument("--quick", action="store_true", help="length 2048, 1 repeat")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--plot", type=Path, default=None, help="also plot memory to this PNG")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-strategy", default="ring", help=argparse.SUPPRESS)


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


def collective_bytes(hlo: str, loop_trips: int) -> dict[str, float]:
    """Bytes one device sends per call, by kind, read from a compiled program's HLO text.

    ``collective-permute`` ops are the ring's transfers, forward and backward (``transpose``
    in the op's name) apart; those inside a ``while`` body run ``loop_trips`` times (the ring
    loops run ``n - 1`` steps; XLA unrolls a loop of one step, whose permutes then sit
    outside). Every other collective is counted once.

    Returns:
      ``{"fwd_step", "fwd", "bwd_step", "bwd", "other"}`` in bytes: per step (one loop
      iteration) and per call.
    """
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    totals = dict.fromkeys(("fwd_step", "fwd", "bwd_step", "bwd", "other"), 0.0)
    computation = ""
    for line in hlo.splitlines():
        if line.endswith("{") and not line.startswith(" "):
            computation = line.removeprefix("ENTRY ").split()[0].lstrip("%")
            continue
        found = _COLLECTIVE.search(line)
        if found is None:
            continue
        size = 0
        for dtype, dims in _SHAPE.findall(found.group(1)):
            count = 1
            for dim in filter(None, dims.split(",")):
                count *= int(dim)
            size += count * DTYPE_BYTES.get(dtype, 4)
        if found.group(2) != "collective-permute":
            totals["other"] += size
            continue
        direction = "bwd" if "transpose(" in line else "fwd"
        in_loop = computation in bodies
        totals[direction] += size * (loop_trips if in_loop else 1)
        totals[direction + "_step"] += size if in_loop else 0
    return totals


def measure(
    devices: int,
    length: int,
    depth: int,
    score_mode: str,
    repeats: int,
    value_mask: bool,
    strategy: str = "ring",
    memory_only: bool = False,
) -> dict:
    """One row of the table, measured in this process on its first ``devices`` devices."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from luong_attention.parallel import sequence_parallel_attention, to_zigzag

    mesh = Mesh(np.array(jax.devices()[:devices]), ("sp",))
    split = NamedSharding(mesh, P(None, "sp", None))
    kind, layout = STRATEGIES[strategy]
    mask = jnp.arange(length) < length - length // 10 if value_mask else None
    if mask is not None and layout == "zigzag":
        mask = to_zigzag(mask, devices, axis=-1)

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
            strategy=kind,
            layout=layout,
        )

    def loss(query, key, value):
        return jnp.sum(forward(query, key, value))

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    if memory_only:
        inputs = [
            jax.ShapeDtypeStruct((1, length, depth), jnp.float32, sharding=split) for _ in range(3)
        ]
    else:
        rng = np.random.default_rng(0)
        inputs = [
            jax.device_put(rng.normal(size=(1, length, depth)).astype(np.float32), split)
            for _ in range(3)
        ]
    compiled = grad_fn.lower(*inputs).compile()
    analysis = compiled.memory_analysis()
    device_bytes = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    sent = collective_bytes(compiled.as_text(), loop_trips=devices - 1)
    ring = kind == "ring" and devices > 1
    block = -(-length // devices) * 2 * depth * 4 if ring else 0  # K + V shards, bytes
    row = {
        "strategy": strategy,
        "devices": devices,
        "length": length,
        "depth": depth,
        "score_mode": score_mode,
        "value_mask": value_mask,
        "device_mib": device_bytes / MIB,
        "permute_fwd_step_mib": sent["fwd_step"] / MIB,
        "permute_bwd_step_mib": sent["bwd_step"] / MIB,
        "permute_fwd_mib": sent["fwd"] / MIB,
        "permute_bwd_mib": sent["bwd"] / MIB,
        # The ring formula: n - 1 K/V blocks forward; n - 1 K/V blocks and n dK/dV backward.
        "formula_fwd_mib": (devices - 1) * block / MIB,
        "formula_bwd_mib": (2 * devices - 1) * block / MIB,
        "other_collectives_mib": sent["other"] / MIB,
    }
    if not memory_only:
        rss_growth = _rss_growth(compiled, inputs)
        row["process_rss_mib"] = rss_growth / MIB
        row["forward_ms"] = 1e3 * _timed(jax.jit(forward), inputs, repeats)
        row["grad_ms"] = 1e3 * _timed(compiled, inputs, repeats)
    return row


def _run_child(devices: int, strategy: str, args: argparse.Namespace) -> dict:
    """Measures one strategy and device count in a fresh process with that many devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.setdefault("JAX_PLATFORMS", "cpu")
    command = [
        sys.executable,
        "-m",
        "luong_attention.tools.bench_parallel",
        "--child",
        str(devices),
        "--child-strategy",
        strategy,
    ]
    command += ["--length", str(args.length), "--depth", str(args.depth)]
    command += ["--score-mode", args.score_mode, "--repeats", str(args.repeats)]
    command += ["--value-mask"] if args.value_mask else []
    command += ["--memory-only"] if args.memory_only else []
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {devices}-device child failed:\n{done.stdout}{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (memory also as a ratio to the strategy on one device)."""
    timed = "forward_ms" in rows[0]
    header = (
        "| strategy | devices | device MiB (XLA, fwd+grad) | of 1 device | sent per step fwd / "
        "bwd MiB | sent per call fwd / bwd MiB | ring formula fwd / bwd MiB | other "
        "collectives MiB |"
    )
    header += " process RSS growth MiB | forward ms | fwd+grad ms |" if timed else ""
    lines = [header, "|---|" + "---:|" * (header.count("|") - 2)]
    one_device = {row["strategy"]: row["device_mib"] for row in rows if row["devices"] == 1}
    for row in rows:
        base = one_device.get(row["strategy"])
        ratio = "n/a" if base is None else f"{row['device_mib'] / base:.3f}"
        line = (
            f"| {row['strategy']} | {row['devices']} | {row['device_mib']:.1f} | "
            f"{ratio} | {row['permute_fwd_step_mib']:.1f} / "
            f"{row['permute_bwd_step_mib']:.1f} | {row['permute_fwd_mib']:.1f} / "
            f"{row['permute_bwd_mib']:.1f} | {row['formula_fwd_mib']:.1f} / "
            f"{row['formula_bwd_mib']:.1f} | {row['other_collectives_mib']:.1f} |"
        )
        if timed:
            line += (
                f" {row['process_rss_mib']:.1f} | {row['forward_ms']:.1f} | {row['grad_ms']:.1f} |"
            )
        lines.append(line)
    return "\n".join(lines)


def format_balance(length: int, devices: list[int]) -> str:
    """The causal score work per device, contiguous and zigzag ring layouts (a table)."""
    from luong_attention.parallel import ring_score_work

    lines = [
        "| layout | devices | score work per device (M entries) | longest / mean |",
        "|---|---:|---|---:|",
    ]
    for count in devices:
        for layout in ("contiguous", "zigzag"):
            if count == 1 or (layout == "zigzag" and length % (2 * count)):
                continue
            work = ring_score_work(length, length, count, layout=layout).sum(axis=1)
            listed = " ".join(f"{w / 2**20:.0f}" for w in work)
            lines.append(f"| {layout} | {count} | {listed} | {work.max() / work.mean():.3f} |")
    return "\n".join(lines)


def plot_memory(rows: list[dict], path: Path) -> None:
    """Per-device memory against devices, one line per strategy, and the ideal ``1/n``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy in dict.fromkeys(row["strategy"] for row in rows):
        mine = [row for row in rows if row["strategy"] == strategy]
        counts = [row["devices"] for row in mine]
        ax.plot(counts, [row["device_mib"] for row in mine], marker="o", label=strategy)
    ones = [row["device_mib"] for row in rows if row["devices"] == 1]
    if ones:
        counts = sorted({row["devices"] for row in rows})
        ax.plot(counts, [min(ones) / n for n in counts], "k--", label="ideal: 1/n of one device")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("devices (forced host devices)")
    ax.set_ylabel("per-device MiB (XLA memory_analysis)")
    first = rows[0]
    ax.set_title(f"causal {first['score_mode']} fwd+grad, T={first['length']}, D={first['depth']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> None:
    """Measures every strategy and device count in its own child process; prints tables."""
    if args.quick:
        args.length, args.repeats = 2048, 1
    if args.child is not None:
        row = measure(
            args.child,
            args.length,
            args.depth,
            args.score_mode,
            args.repeats,
            args.value_mask,
            args.child_strategy,
            args.memory_only,
        )
        print(json.dumps(row))
        return
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            arguments.check_writable(path.parent, flag)
    masked = ", last tenth of the keys masked" if args.value_mask else ""
    print(
        f"sequence-parallel {args.score_mode} attention, causal{masked}, batch 1, "
        f"Tq = Tv = {args.length}, depth {args.depth}, float32"
    )
    rows = []
    for strategy in args.strategies:
        for devices in args.devices:
            rows.append(_run_child(devices, strategy, args))
            print(f"  {strategy} on {devices} device(s) done", file=sys.stderr)
    print(format_table(rows))
    if args.balance:
        print()
        print(format_balance(args.length, args.devices))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=2)
    if args.plot:
        plot_memory(rows, args.plot)


def main() -> None:
    """Entry point of ``python -m luong_attention.tools.bench_parallel``."""
    parser = argparse.ArgumentParser(prog="luong-attention bench-parallel", description=__doc__)
    add_arguments(parser)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
