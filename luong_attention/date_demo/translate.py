"""``luong-attention translate TEXT...``: normalise dates with the model the demo trained.

Loads what ``luong-attention demo`` saved, decodes every text greedily in one batch, and for
each prints the answer, the model's confidence (the mean log-probability it gave each of the
answer's characters, and the least sure character's probability) and the alignment as text: one row per output character, one column per
input character, darker characters for more attention. It warns when the answer is not a real
calendar date or the confidence is low; ``--json`` prints one JSON object per text instead.

Texts come from the arguments or, when there are none (or for ``-``), one per line from
standard input, where blank lines are skipped; every text is stripped of surrounding spaces.
``--checkpoint`` takes the folder the demo wrote or the checkpoint file in it. An empty text,
a text longer than the model was trained to read and a missing or unreadable checkpoint are
user errors: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from luong_attention.date_demo import dates, seq2seq

# From no attention to all of it.
_SHADES = " .:-=+*#%@"
# An answer is flagged as unsure when its least sure character has a probability below this.
# For the default demo model, 1 of 3400 held-out test texts falls below it (their median is
# 0.9994); "tomorrow" and "hello world" get 0.50, "the 5th of May" (no year) 0.69.
LOW_CONFIDENCE = 0.9
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class InputError(ValueError):
    """A text the model cannot take: empty, or longer than it was trained to read."""


@dataclass(frozen=True)
class Translation:
    """One text and the model's answer.

    Attributes:
      text: the input.
      answer: the ``YYYY-MM-DD``-shaped output (``dates.TARGET_LENGTH`` characters).
      log_probs: ``[TARGET_LENGTH]`` log-probability of each answer character.
      weights: ``[TARGET_LENGTH, len(text)]`` attention over the input characters.
      unknown: the input's characters outside the model's alphabet, in order, once each.
    """

    text: str
    answer: str
    log_probs: np.ndarray
    weights: np.ndarray
    unknown: str

    @property
    def confidence(self) -> float:
        """Mean log-probability per answer character (0 is certain)."""
        return float(np.mean(self.log_probs))

    @property
    def least_sure(self) -> float:
        """Probability of the answer's least sure character."""
        return float(np.exp(np.min(self.log_probs)))

    @property
    def is_date(self) -> bool:
        """Whether the answer is a real calendar date."""
        return is_calendar_date(self.answer)

    def as_json(self) -> dict:
        """The fields ``--json`` prints."""
        return {
            "input": self.text,
            "output": self.answer,
            "is_date": self.is_date,
            "mean_log_prob": round(self.confidence, 6),
            "min_char_prob": round(self.least_sure, 6),
            "low_confidence": self.least_sure < LOW_CONFIDENCE,
            "unknown_characters": self.unknown,
            "alignment": np.round(self.weights.astype(np.float64), 4).tolist(),
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the command's arguments."""
    parser.add_argument(
        "texts",
        nargs="*",
        metavar="TEXT",
        help='written dates, e.g. "Mittwoch, 25. Nov. 26"; none or "-": one per line from '
        "stdin (blank lines skipped); surrounding spaces are stripped",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("luong_attention_out"),
        help="folder written by `luong-attention demo --out`, or the checkpoint.msgpack in it "
        "(default luong_attention_out)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per text and line (input, output, is_date, mean_log_prob, "
        "min_char_prob, low_confidence, unknown_characters, alignment)",
    )


def run(args: argparse.Namespace) -> None:
    """Translates ``args.texts`` (or stdin's lines) and prints the answers.

    Raises:
      argparse.ArgumentError: for no text, a bad text or a missing or unreadable checkpoint.
    """
    texts = _texts(args.texts)
    if not texts:
        raise argparse.ArgumentError(
            None, "no text to translate: give TEXT arguments or pipe one text per line to stdin"
        )
    try:
        results = translate(texts, checkpoint_folder(args.checkpoint))
    except (InputError, FileNotFoundError, seq2seq.CheckpointError) as error:
        raise argparse.ArgumentError(None, str(error)) from None
    for index, result in enumerate(results):
        if args.json:
            print(json.dumps(result.as_json(), ensure_ascii=False))
        else:
            print(("\n" if index else "") + format_translation(result))


def _texts(arguments: Sequence[str]) -> list[str]:
    """The texts to translate, stripped: the arguments, where ``-`` stands for stdin's lines.

    Without arguments, stdin's lines, unless it is a terminal (nothing was piped). Blank stdin
    lines are skipped; a blank argument is kept (and rejected as empty by :func:`translate`).
    """
    if not arguments:
        arguments = [] if sys.stdin is None or sys.stdin.isatty() else ["-"]
    texts = []
    for argument in arguments:
        texts += _stdin_texts() if argument == "-" else [argument.strip()]
    return texts


def _stdin_texts() -> list[str]:
    """Standard input's lines that are not blank, stripped."""
    lines = sys.stdin.read().splitlines() if sys.stdin is not None else []
    return [line.strip() for line in lines if line.strip()]


def checkpoint_folder(path: Path) -> Path:
    """The folder of a checkpoint: ``path``, or its parent when ``path`` names the checkpoint
    file (``.../checkpoint.msgpack``, the path ``luong-attention demo`` prints)."""
    if path.name == seq2seq.CHECKPOINT_FILE and not path.is_dir():
        return path.parent
    return path


def translate(texts: Sequence[str], checkpoint: Path) -> list[Translation]:
    """Greedy translations of ``texts`` with the model saved in ``checkpoint``, in one batch.

    Raises:
      InputError: for an empty text or one longer than the model's ``max_source_length``.
      FileNotFoundError, seq2seq.CheckpointError: from :func:`seq2seq.load_checkpoint`.
    """
    for number, text in enumerate(texts, start=1):
        if not text:
            raise InputError(f"text {number} is empty: give a written date")
    limit = seq2seq.load_config(checkpoint)[0].max_source_length
    for number, text in enumerate(texts, start=1):
        if len(text) > limit:
            raise InputError(
                f"text {number} has {len(text)} characters; the model in {checkpoint} was "
                f"trained on texts of at most {limit}"
            )
    params, config, alphabet = seq2seq.load_checkpoint(checkpoint)
    source, lengths = dates.encode_sources(texts, alphabet, limit)
    tokens, log_probs, weights = seq2seq.make_greedy_decoder(config)(params, source, lengths)
    answers = dates.decode_targets(np.asarray(tokens))
    known = set(alphabet)
    return [
        Translation(
            text=text,
            answer=answer,
            log_probs=np.asarray(log_probs[row]),
            weights=np.asarray(weights[row, :, : len(text)]),
            unknown="".join(dict.fromkeys(c for c in text if c not in known)),
        )
        for row, (text, answer) in enumerate(zip(texts, answers, strict=True))
    ]


def is_calendar_date(answer: str) -> bool:
    """Whether ``answer`` is ``YYYY-MM-DD`` naming a day that exists (``2020-02-30`` does not)."""
    if not _ISO_DATE.fullmatch(answer):
        return False
    try:
        dt.date(int(answer[:4]), int(answer[5:7]), int(answer[8:]))
    except ValueError:
        return False
    return True


def format_translation(result: Translation) -> str:
    """The text report of one translation: answer, confidence, warnings, alignment."""
    lines = [
        f"input : {result.text}",
        f"output: {result.answer}",
        f"confidence: {result.confidence:.4f} mean log-probability per character "
        f"(least sure character: {result.least_sure:.2f})",
    ]
    if not result.is_date:
        lines.append(f"warning: {result.answer} is not a real calendar date")
    if result.least_sure < LOW_CONFIDENCE:
        lines.append(
            "warning: low confidence: the text may not be a date in a format the model knows"
        )
    if result.unknown:
        lines.append(f"warning: characters the model never saw: {result.unknown!r}")
    lines.append("alignment (rows: output characters, columns: input characters):")
    lines.append(format_alignment(result.weights, result.answer, result.text))
    return "\n".join(lines)


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
