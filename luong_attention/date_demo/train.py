"""``luong-attention demo``: trains an attentional seq2seq model to normalise dates.

Human-written dates in English, French, German and Spanish (34 formats, random casing, see
:mod:`luong_attention.date_demo.dates`) are translated character by character into ``YYYY-MM-DD`` by the
model of :mod:`luong_attention.date_demo.seq2seq`. The held-out test dates never appear in training.
The run prints the exact-match accuracy per language and per format, saves a checkpoint and a
heatmap of the learned alignment, and reports the wall time of the whole command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from luong_attention.date_demo import arguments, dates, seq2seq
from luong_attention.date_demo.plotting import plot_attention

# When the command started (this module is imported as the command line is parsed, after the
# interpreter and jax have loaded): the reported wall time counts from here.
_START = time.perf_counter()

SOURCE_LENGTH = 40  # longest text any format writes is 38 characters
NUM_TEST_DATES = 2000
TEST_PER_FORMAT = 100
QUICK_TEST_PER_FORMAT = 5
# What --quick's accuracy means; the default run reaches 100% (docs/demo.md).
QUICK_NOTE = (
    "--quick: 60 training steps are far too few to learn the task, so an exact match near 0% "
    "is expected; the run only checks that training, evaluation and saving work (the default "
    "2000 steps reach about 100%)"
)
HEATMAP_FORMATS = (
    "en:the_spelled_of_month",
    "fr:weekday_d_month_yyyy",
    "de:weekday_d._mon_yy",
    "es:el_spelled_de_month_de_yyyy",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the demo's flags."""
    parser.add_argument(
        "--steps", type=arguments.positive_int, default=2000, help="training steps (default 2000)"
    )
    parser.add_argument(
        "--batch-size",
        type=arguments.positive_int,
        default=64,
        help="examples per step (default 64)",
    )
    parser.add_argument(
        "--learning-rate",
        type=arguments.positive_float,
        default=5e-3,
        help="peak Adam learning rate (default 5e-3)",
    )
    parser.add_argument(
        "--seed",
        type=arguments.natural_int,
        default=0,
        help="seed of the data and the model (default 0)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("luong_attention_out"),
        help="output folder, created if missing (default luong_attention_out)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a run of seconds (60 steps, small test set), for CI"
    )


def run(args: argparse.Namespace) -> None:
    """Trains, evaluates, saves the checkpoint and the heatmap, prints where they went."""
    arguments.check_writable(args.out, "--out")
    steps = 60 if args.quick else args.steps
    per_format = QUICK_TEST_PER_FORMAT if args.quick else TEST_PER_FORMAT
    rng = np.random.default_rng(args.seed)
    train_dates, test_dates = dates.split_dates(NUM_TEST_DATES, args.seed)
    alphabet = dates.source_alphabet()
    train = dates.sample_examples(train_dates, steps * args.batch_size, rng)
    test = dates.sample_examples(test_dates, per_format * len(dates.FORMATS), rng, balanced=True)
    print(
        f"{len(dates.FORMATS)} formats in {len(dates.LANGUAGES) - 1} languages + numeric; "
        f"{len(train_dates)} training dates, {len(test_dates)} held-out test dates "
        f"({len(test)} test examples)"
    )

    config = seq2seq.ModelConfig(source_vocab=len(alphabet) + 2, max_source_length=SOURCE_LENGTH)
    params = _train(args, steps, train, alphabet, config)

    decode = seq2seq.make_greedy_decoder(config)
    predictions, weights = _decode_all(decode, params, [e.text for e in test], alphabet)
    correct = np.array([p == e.target for p, e in zip(predictions, test, strict=True)])
    _print_accuracy(test, correct)

    checkpoint, meta = seq2seq.save_checkpoint(
        args.out,
        params,
        config,
        alphabet,
        steps=steps,
        seed=args.seed,
        test_accuracy=float(correct.mean()),
    )
    heatmap = args.out / "attention.png"
    _save_heatmap(heatmap, test, predictions, weights)
    print(f"checkpoint: {checkpoint} (config and alphabet: {meta})")
    print(f"attention heatmap: {heatmap}")
    print(f'try: luong-attention translate "Mittwoch, 25. Nov. 26" --checkpoint {args.out}')
    print(
        f"exact match on held-out dates: {correct.mean():.2%}; "
        f"wall time {time.perf_counter() - _START:.1f} s (jax {jax.__version__}, "
        f"{jax.devices()[0].platform})"
    )
    if args.quick:
        print(QUICK_NOTE)


def _train(
    args: argparse.Namespace,
    steps: int,
    train: Sequence[dates.Example],
    alphabet: str,
    config: seq2seq.ModelConfig,
) -> Any:
    """Runs the training loop with a tqdm bar (loss, teacher-forced exact match).

    Returns:
      The trained parameters.
    """
    source, lengths = dates.encode_sources([e.text for e in train], alphabet, SOURCE_LENGTH)
    targets = dates.encode_targets([e.target for e in train])
    params = seq2seq.init_params(config, SOURCE_LENGTH, args.seed)
    optimizer = seq2seq.make_optimizer(steps, args.learning_rate, warmup_steps=steps // 10)
    opt_state = optimizer.init(params)
    train_step = seq2seq.make_train_step(config, optimizer)
    batch = args.batch_size
    with tqdm(range(steps), desc="training", unit="step", mininterval=0.5) as bar:
        for step in bar:
            rows = slice(step * batch, (step + 1) * batch)
            params, opt_state, loss, accuracy = train_step(
                params, opt_state, source[rows], lengths[rows], targets[rows]
            )
            if step % 25 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{float(loss):.4f}", acc=f"{float(accuracy):.3f}")
    return params


def _decode_all(
    decode: Callable, params: Any, texts: Sequence[str], alphabet: str, chunk: int = 1024
) -> tuple[list[str], np.ndarray]:
    """Greedy answers and alignments of ``texts``, in fixed-size chunks (one compilation).

    Returns:
      ``(answers, weights [count, T, SOURCE_LENGTH])``.
    """
    source, lengths = dates.encode_sources(texts, alphabet, SOURCE_LENGTH)
    count = len(texts)
    chunk = min(chunk, count)
    padded = -(-count // chunk) * chunk
    source = np.pad(source, ((0, padded - count), (0, 0)))
    lengths = np.pad(lengths, (0, padded - count), constant_values=1)
    tokens, weights = [], []
    for start in range(0, padded, chunk):
        t, _, w = decode(params, source[start : start + chunk], lengths[start : start + chunk])
        tokens.append(np.asarray(t))
        weights.append(np.asarray(w))
    tokens = np.concatenate(tokens)[:count]
    return dates.decode_targets(tokens), np.concatenate(weights)[:count]


def _print_accuracy(test: Sequence[dates.Example], correct: np.ndarray) -> None:
    """Prints exact-match accuracy per language and per format."""
    by_language: dict[str, list[bool]] = defaultdict(list)
    by_format: dict[str, list[bool]] = defaultdict(list)
    for example, ok in zip(test, correct, strict=True):
        by_language[example.format_name.split(":")[0]].append(bool(ok))
        by_format[example.format_name].append(bool(ok))
    print(
        "exact match per language: "
        + ", ".join(f"{lang} {np.mean(by_language[lang]):.1%}" for lang in dates.LANGUAGES)
    )
    print("exact match per format:")
    for fmt in dates.FORMATS:
        hits = by_format[fmt.name]
        sample = fmt.render(dt.date(2026, 11, 25))
        print(f"  {fmt.name:34s} {np.mean(hits):7.1%}  ({sum(hits)}/{len(hits)})  e.g. {sample}")


def _save_heatmap(
    path: Path, test: Sequence[dates.Example], predictions: Sequence[str], weights: np.ndarray
) -> None:
    """Draws the alignment of one test example per :data:`HEATMAP_FORMATS` entry into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = [
        next(i for i, e in enumerate(test) if e.format_name == name) for name in HEATMAP_FORMATS
    ]
    fig, axes = plt.subplots(2, 2, figsize=(13, 7))
    for ax, i in zip(axes.flat, picks, strict=True):
        text = test[i].text
        plot_attention(
            weights[i, :, : len(text)],
            list(predictions[i]),
            ["␣" if c == " " else c for c in text],
            title=f"{test[i].format_name}: {text!r}",
            ax=ax,
        )
        ax.set_xlabel("input character")
        ax.set_ylabel("output character")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
