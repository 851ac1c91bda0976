"""The ``luong-attention`` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

# subcommand -> (module with add_arguments(parser) and run(args), one-line help)
COMMANDS = {
    "demo": (
        "luong_attention.date_demo.train",
        "train a seq2seq model with Luong attention on dates",
    ),
    "translate": (
        "luong_attention.date_demo.translate",
        "normalise a date with the demo's checkpoint",
    ),
    "bench": ("luong_attention.tools.bench", "time and memory against Keras 3 and jax.nn"),
    "bench-parallel": ("luong_attention.tools.bench_parallel", "time and memory against devices"),
    "bench-keras": ("luong_attention.tools.bench_keras", "a Keras training step: ours vs plain"),
}


def main(argv: Sequence[str] | None = None) -> None:
    """Parses ``argv`` and runs the chosen subcommand."""
    parser = argparse.ArgumentParser(prog="luong-attention", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    importlib.import_module(COMMANDS[args.command][0]).run(args)


if __name__ == "__main__":
    main()
