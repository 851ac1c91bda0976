"""The demo's model, `luong-attention demo --quick` end to end, `translate`, plot_attention."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

from luong_attention.date_demo import dates, seq2seq, train
from luong_attention.date_demo.plotting import plot_attention
from luong_attention.date_demo.translate import (
    InputError,
    Translation,
    format_alignment,
    format_translation,
    is_calendar_date,
    translate,
)
from luong_attention.tools import cli

matplotlib.use("Agg")

CONFIG = seq2seq.ModelConfig(
    source_vocab=len(dates.source_alphabet()) + 2, embed=5, encoder_features=6, decoder_features=7
)
TEXTS = ["Mittwoch, 25. Nov. 26", "25/11/2026", "le premier mars 1999"]
DECODE = seq2seq.make_greedy_decoder(CONFIG)  # shared, so each shape compiles once


def _batch(length: int):
    return dates.encode_sources(TEXTS, dates.source_alphabet(), length)


def test_greedy_decoding_feeds_back_its_own_predictions():
    params = seq2seq.init_params(CONFIG, 23, seed=3)
    source, lengths = _batch(23)
    tokens, log_probs, weights = DECODE(params, source, lengths)
    assert tokens.shape == log_probs.shape == (3, dates.TARGET_LENGTH)
    assert weights.shape == (3, dates.TARGET_LENGTH, 23)
    # Teacher forcing with the greedy answer as the target reproduces the same argmaxes.
    logits, forced = seq2seq.DateTranslator(CONFIG).apply(
        {"params": params}, source, lengths, seq2seq.teacher_inputs(tokens)
    )
    np.testing.assert_array_equal(jnp.argmax(logits, -1), tokens)
    np.testing.assert_allclose(forced, weights, atol=1e-6)
    # The reported log-probabilities are those of the chosen tokens (NumPy log-softmax).
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    chosen = np.take_along_axis(log_softmax, np.asarray(tokens)[..., None], -1)[..., 0]
    np.testing.assert_allclose(log_probs, chosen, atol=1e-5)


def test_padding_is_masked_out():
    params = seq2seq.init_params(CONFIG, 23, seed=4)
    short_tokens, _, short_weights = DECODE(params, *_batch(23))
    long_source, long_lengths = _batch(37)
    long_source[long_source == dates.PAD] = 5  # garbage in the padding must not matter
    long_tokens, _, long_weights = DECODE(params, long_source, long_lengths)
    np.testing.assert_array_equal(short_tokens, long_tokens)
    np.testing.assert_allclose(short_weights, long_weights[..., :23], atol=1e-6)
    # Weights are a distribution over each example's real characters, zero on padding.
    np.testing.assert_allclose(long_weights.sum(-1), 1.0, atol=1e-5)
    for row, length in enumerate(long_lengths):
        assert (long_weights[row, :, length:] == 0).all()


def test_train_step_reduces_the_loss():
    source, lengths = _batch(23)
    targets = dates.encode_targets(["2026-11-25", "2026-11-25", "1999-03-01"])
    params = seq2seq.init_params(CONFIG, 23, seed=0)
    optimizer = seq2seq.make_optimizer(40, 3e-2, warmup_steps=3)
    state = optimizer.init(params)
    step = seq2seq.make_train_step(CONFIG, optimizer)
    losses = []
    for _ in range(40):
        params, state, loss, accuracy = step(params, state, source, lengths, targets)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0]
    assert 0.0 <= float(accuracy) <= 1.0


def test_checkpoint_round_trip(tmp_path):
    params = seq2seq.init_params(CONFIG, 9, seed=1)
    seq2seq.save_checkpoint(tmp_path, params, CONFIG, "abc", steps=3)
    loaded, config, alphabet = seq2seq.load_checkpoint(tmp_path)
    assert config == CONFIG and alphabet == "abc"
    assert json.loads((tmp_path / seq2seq.CONFIG_FILE).read_text())["steps"] == 3
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    with pytest.raises(FileNotFoundError, match="luong-attention demo"):
        seq2seq.load_checkpoint(tmp_path / "missing")


def test_damaged_or_mismatched_checkpoints_are_named(tmp_path):
    params = seq2seq.init_params(CONFIG, 9, seed=1)
    seq2seq.save_checkpoint(tmp_path, params, CONFIG, "abc")
    meta = json.loads((tmp_path / seq2seq.CONFIG_FILE).read_text())
    meta["model"]["decoder_features"] = 8  # another model's sizes
    (tmp_path / seq2seq.CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(seq2seq.CheckpointError, match="does not hold the model"):
        seq2seq.load_checkpoint(tmp_path)
    (tmp_path / seq2seq.CONFIG_FILE).write_text("{not json")
    with pytest.raises(seq2seq.CheckpointError, match="not a readable model config"):
        seq2seq.load_checkpoint(tmp_path)
    seq2seq.save_checkpoint(tmp_path, params, CONFIG, "abc")
    (tmp_path / seq2seq.CHECKPOINT_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(seq2seq.CheckpointError, match="not a readable checkpoint"):
        seq2seq.load_checkpoint(tmp_path)


@pytest.mark.slow
def test_demo_quick_then_translate(tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(["demo", "--quick", "--out", str(out), "--seed", "1"])
    printed = capsys.readouterr().out
    for path in (out / "checkpoint.msgpack", out / "config.json", out / "attention.png"):
        assert str(path) in printed
        assert path.stat().st_size > 0
    assert (out / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "exact match per language: en" in printed
    for fmt in dates.FORMATS:
        assert fmt.name in printed
    assert "wall time" in printed
    assert printed.splitlines()[-1] == train.QUICK_NOTE

    assert json.loads((out / "config.json").read_text())["model"]["max_source_length"] == 40

    # translate takes the checkpoint file the demo printed as well as its folder.
    (checkpoint,) = re.findall(r"^checkpoint: (\S+)", printed, flags=re.M)
    cli.main(["translate", "Mittwoch, 25. Nov. 26", "--checkpoint", checkpoint])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "input : Mittwoch, 25. Nov. 26"
    answer = lines[1].removeprefix("output: ")
    assert len(answer) == dates.TARGET_LENGTH and set(answer) <= set(dates.TARGET_CHARS)
    assert lines[2].startswith("confidence: ")
    # The alignment header, the input, then one row per output character, last.
    header = lines.index("alignment (rows: output characters, columns: input characters):")
    assert len(lines) == header + 2 + dates.TARGET_LENGTH
    # translate answers what the saved model answers.
    params, config, alphabet = seq2seq.load_checkpoint(out)
    source, lengths = dates.encode_sources(["Mittwoch, 25. Nov. 26"], alphabet, 40)
    tokens, _, _ = seq2seq.make_greedy_decoder(config)(params, source, lengths)
    assert dates.decode_targets(np.asarray(tokens))[0] == answer


def test_translate_without_checkpoint_exits_cleanly(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["translate", "25/11/2026", "--checkpoint", str(tmp_path)])
    assert exited.value.code == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(InputError, match="text 2 is empty"):
        translate(["25/11/2026", ""], tmp_path)


@pytest.mark.parametrize(
    ("answer", "real"),
    [
        ("2020-02-29", True),
        ("1900-01-01", True),
        ("2021-02-29", False),
        ("2020-31-12", False),
        ("2020-04-31", False),
        ("6666666666", False),
        ("2020-1-011", False),
        ("0000-01-01", False),
    ],
)
def test_is_calendar_date(answer, real):
    assert is_calendar_date(answer) is real


def _translation(answer: str, probs: list[float], text: str = "25/11/2026") -> Translation:
    weights = np.full((dates.TARGET_LENGTH, len(text)), 1 / len(text))
    return Translation(text, answer, np.log(np.array(probs)), weights, unknown="")


def test_translation_report_warns_when_unsure_or_not_a_date():
    sure = _translation("2026-11-25", [0.99] * 10)
    report = format_translation(sure)
    assert "warning" not in report
    expected = np.log(0.99)
    assert f"confidence: {expected:.4f} mean log-probability per character" in report
    assert sure.as_json()["low_confidence"] is False and sure.as_json()["is_date"] is True

    unsure = _translation("2026-11-25", [0.99] * 9 + [0.5])
    assert "warning: low confidence" in format_translation(unsure)
    assert unsure.as_json()["low_confidence"] is True
    assert unsure.as_json()["min_char_prob"] == pytest.approx(0.5)
    assert unsure.as_json()["mean_log_prob"] == pytest.approx((9 * np.log(0.99) + np.log(0.5)) / 10)

    impossible = _translation("2020-31-12", [0.99] * 10)
    assert "warning: 2020-31-12 is not a real calendar date" in format_translation(impossible)
    assert impossible.as_json()["is_date"] is False


def test_format_alignment_marks_the_strongest_input():
    weights = np.array([[0.0, 1.0, 0.0], [0.7, 0.1, 0.2]])
    text = format_alignment(weights, "ab", "x y")
    lines = text.splitlines()
    assert lines[0] == "    x␣y"
    assert lines[1] == " a   @    <- ' ' (1.00)"
    assert lines[2] == " b  #.:   <- 'x' (0.70)"


def test_plot_attention_labels_and_figure():
    weights = np.random.default_rng(0).dirichlet(np.ones(5), size=3)
    fig = plot_attention(weights, ["q0", "q1", "q2"], list("abcde"), title="t")
    ax = fig.axes[0]
    assert isinstance(fig, matplotlib.figure.Figure)
    assert [t.get_text() for t in ax.get_xticklabels()] == list("abcde")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["q0", "q1", "q2"]
    np.testing.assert_allclose(ax.images[0].get_array(), weights, rtol=1e-6)
    assert ax.get_title() == "t"
    default = plot_attention(weights)
    assert [t.get_text() for t in default.axes[0].get_xticklabels()] == list("01234")
    with pytest.raises(ValueError, match="key_tokens"):
        plot_attention(weights, ["q0", "q1", "q2"], list("abcd"))
    with pytest.raises(ValueError, match="q_length, kv_length"):
        plot_attention(weights[None])
    matplotlib.pyplot.close("all")
