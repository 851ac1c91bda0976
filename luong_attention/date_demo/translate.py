"""``luong-attention translate "text" --checkpoint DIR``: normalise one date with a trained model.

Loads what ``luong-attention demo`` saved, decodes greedily, and prints the answer with its
alignment as text: one row per output character, one column per input character, darker
characters for more attention.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from luong_attention.date_demo import dates, seq2seq

# From no attention to all of it.
_SHADES = " .:-=+*#%@"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the command's arguments."""
    parser.add_argument("text", help='a written date, e.g. "Mittwoch, 25. Nov. 26"')
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("luong_attention_out"),
        help="folder written by `luong-attention demo --out` (default luong_attention_out)",
    )


def run(args: argparse.Namespace) -> None:
    """Prints the ISO date and the alignment of ``args.text``."""
    try:
        answer, weights = translate(args.text, args.checkpoint)
    except FileNotFoundError as error:
        raise SystemExit(f"luong-attention translate: {error}") from None
    print(f"input : {args.text}")
    print(f"output: {answer}")
    print("alignment (rows: output characters, columns: input characters):")
    print(format_alignment(weights, answer, args.text))


def translate(text: str, checkpoint: Path) -> tuple[str, np.ndarray]:
    """Greedy translation of ``text`` with the model saved in ``checkpoint``.

    Returns:
      ``(answer, weights [TARGET_LENGTH, len(text)])``.

    Raises:
      ValueError: for an empty text.
    """
    if not text:
        raise ValueError("text must hold at least one character. Received: ''")
    params, config, alphabet = seq2seq.load_checkpoint(checkpoint)
    source, lengths = dates.encode_sources([text], alphabet, len(text))
    tokens, weights = seq2seq.make_greedy_decoder(config)(params, source, lengths)
    return dates.decode_targets(np.asarray(tokens))[0], np.asarray(weights[0])


def format_alignment(weights: np.ndarray, outputs: Sequence[str], inputs: Sequence[str]) -> str:
    """Draws ``weights [len(outputs), len(inputs)]`` with :data:`_SHADES` characters.

    Each row also names the input character with the largest weight.
    """
    weights = np.asarray(weights)
    header = "    " + "".join("␣" if c == " " else c for c in inputs)
    rows = [header]
    for out_char, row in zip(outputs, weights, strict=True):
        levels = np.minimum((row * len(_SHADES)).astype(int), len(_SHADES) - 1)
        best = int(np.argmax(row))
        cells = "".join(_SHADES[level] for level in levels)
        rows.append(f" {out_char}  {cells}   <- {inputs[best]!r} ({row[best]:.2f})")
    return "\n".join(rows)
