"""The ``luong-attention`` command line: one subcommand per job.

A command module has ``add_arguments(parser)`` and ``run(args)``. For a user error (a bad
input, a missing file, a flag value out of range) ``run`` raises ``argparse.ArgumentError``,
the exception argparse itself uses for bad arguments; :func:`main` prints its message as one
line on stderr and exits with status 2, as argparse does for a malformed command line.

The commands need packages the library does not (the ``demo`` extra, and the ``keras`` one for
the benchmarks against Keras). Without them ``--help`` and ``--version`` still work, and a
command whose packages are missing says which extra to install (one line, status 2).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import NamedTuple, NoReturn


class Command(NamedTuple):
    """A subcommand of the command line.

    Attributes:
      module: the module with ``add_arguments(parser)`` and ``run(args)``.
      help: the one-line help.
      extras: the extras (``pyproject.toml``'s optional dependencies) whose packages it imports.
    """

    module: str
    help: str
    extras: tuple[str, ...] = ("demo",)


COMMANDS = {
    "demo": Command(
        "luong_attention.date_demo.train",
        "train a seq2seq model with Luong attention on dates",
    ),
    "translate": Command(
        "luong_attention.date_demo.translate",
        "normalise dates with the demo's checkpoint",
    ),
    "bench": Command(
        "luong_attention.tools.bench",
        "time and memory against Keras 3 and jax.nn",
        ("demo", "keras"),
    ),
    "bench-parallel": Command(
        "luong_attention.tools.bench_parallel", "time and memory against devices"
    ),
    "bench-keras": Command(
        "luong_attention.tools.bench_keras",
        "a Keras training step: ours vs plain",
        ("demo", "keras"),
    ),
}

# extra -> the packages it installs that the commands import (pyproject.toml).
EXTRA_PACKAGES = {"demo": ("optax", "matplotlib", "tqdm"), "keras": ("keras",)}

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


def _installed(package: str) -> bool:
    """Whether ``package`` can be found on the path, without importing it."""
    try:
        return importlib.util.find_spec(package) is not None
    except ImportError:  # an import hook refused it
        return False


def _missing_extras(command: Command) -> list[str]:
    """The extras of ``command`` with a package that is not installed."""
    return [
        extra
        for extra in command.extras
        if not all(_installed(package) for package in EXTRA_PACKAGES[extra])
    ]


def _pip_install(extras: Sequence[str]) -> str:
    """The command that installs ``extras``: ``pip install "luong-attention[demo]"``."""
    return f'pip install "luong-attention[{",".join(extras)}]"'


def _install_hint(extras: Sequence[str]) -> str:
    """What a command whose ``extras`` are missing prints: their names and the pip command."""
    names = " and ".join(extras)
    return f"this command needs the {names} extra{'s' * (len(extras) > 1)}: {_pip_install(extras)}"


def build_parser() -> argparse.ArgumentParser:
    """The parser of the whole command line, every subcommand registered.

    A subcommand whose extras are missing takes any arguments (its module is not imported);
    :func:`main` then prints the install hint.
    """
    parser = _Parser(
        prog="luong-attention",
        description="Luong attention for JAX and Flax: the demo, its translator and the benchmarks.",
        epilog="examples:\n  luong-attention demo\n  luong-attention translate --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        missing = _missing_extras(command)
        if missing:
            # No --help either: every argument is left to main(), which prints the hint.
            stub = sub.add_parser(
                name,
                help=f"{command.help} (not installed: {_pip_install(missing)})",
                add_help=False,
            )
            stub.set_defaults(missing_extras=missing)
            continue
        module = importlib.import_module(command.module)
        subparser = sub.add_parser(
            name,
            help=command.help,
            description=module.__doc__.split("\n\n")[0].replace("``", ""),
            epilog="examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES.get(name, [])),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parses ``argv`` and runs the chosen subcommand; user errors exit with status 2."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    prog = f"{parser.prog} {args.command}"
    if getattr(args, "missing_extras", None):
        parser.exit(USAGE_ERROR, f"{prog}: error: {_install_hint(args.missing_extras)}\n")
    if unknown:
        parser.exit(
            USAGE_ERROR,
            f"{prog}: error: unrecognized arguments: {' '.join(unknown)} (see {prog} --help)\n",
        )
    try:
        importlib.import_module(COMMANDS[args.command].module).run(args)
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
