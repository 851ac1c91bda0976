"""The ``luong-attention`` command line: one subcommand per job.

A command module has ``add_arguments(parser)`` and ``run(args)``. For a user error (a bad
input, a missing file, a flag value out of range) ``run`` raises ``argparse.ArgumentError``,
the exception argparse itself uses for bad arguments; :func:`main` prints its message as one
line on stderr and exits with status 2, as argparse does for a malformed command line.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

# subcommand -> (module with add_arguments(parser) and run(args), one-line help)
COMMANDS = {
    "demo": (
        "luong_attention.date_demo.train",
        "train a seq2seq model with Luong attention on dates",
    ),
    "translate": (
        "luong_attention.date_demo.translate",
        "normalise dates with the demo's checkpoint",
    ),
    "bench": ("luong_attention.tools.bench", "time and memory against Keras 3 and jax.nn"),
    "bench-parallel": ("luong_attention.tools.bench_parallel", "time and memory against devices"),
    "bench-keras": ("luong_attention.tools.bench_keras", "a Keras training step: ours vs plain"),
}

# subcommand -> example command lines shown at the end of its --help
EXAMPLES = {
    "demo": [
        "luong-attention demo                      # train, evaluate, save (about a minute)",
        "luong-attention demo --quick --out /tmp/m # 60 steps, for a smoke test",
    ],
    "translate": [
        'luong-attention translate "Mittwoch, 25. Nov. 26"',
        'luong-attention translate "25/11/2026" "le premier mars 1999" --json',
        "luong-attention translate --checkpoint run/ < dates.txt   # one text per line",
    ],
    "bench": [
        "luong-attention bench --quick --out /tmp/bench   # a few seconds",
        "luong-attention bench --out docs                 # the full table (minutes)",
    ],
    "bench-keras": [
        "luong-attention bench-keras --quick --out /tmp/bench   # T=1024, seconds",
        "luong-attention bench-keras --out docs                 # T=8192 and 32768 (minutes)",
    ],
    "bench-parallel": [
        "luong-attention bench-parallel --quick --devices 1 2",
        "luong-attention bench-parallel --length 8192 --value-mask --json rows.json",
    ],
}

# Exit status of a user error, as argparse uses for a malformed command line.
USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (no usage block), status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    """``luong-attention X.Y.Z`` from the installed distribution's metadata."""
    return f"luong-attention {importlib.metadata.version('luong-attention')}"


def build_parser() -> argparse.ArgumentParser:
    """The parser of the whole command line, every subcommand registered."""
    parser = _Parser(
        prog="luong-attention",
        description="Luong attention for JAX and Flax: the demo, its translator and the benchmarks.",
        epilog="examples:\n  luong-attention demo\n  luong-attention translate --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(
            name,
            help=help_text,
            description=module.__doc__.split("\n\n")[0].replace("``", ""),
            epilog="examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES.get(name, [])),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parses ``argv`` and runs the chosen subcommand; user errors exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{parser.prog} {args.command}"
    try:
        importlib.import_module(COMMANDS[args.command][0]).run(args)
    except argparse.ArgumentError as error:
        parser.exit(USAGE_ERROR, f"{prog}: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{prog}: interrupted\n")
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly. stdout points at /dev/null so
        # that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
