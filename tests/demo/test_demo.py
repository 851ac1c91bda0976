"""The demo's model, `luong-attention demo --quick` end to end, `translate`, plot_attention."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

from luong_attention.date_demo import dates, seq2seq
from luong_attention.date_demo.plotting import plot_attention
from luong_attention.date_demo.translate import format_alignment, translate
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
    tokens, weights = DECODE(params, source, lengths)
    assert tokens.shape == (3, dates.TARGET_LENGTH)
    assert weights.shape == (3, dates.TARGET_LENGTH, 23)
    # Teacher forcing with the greedy answer as the target reproduces the same argmaxes.
    logits, forced = seq2seq.DateTranslator(CONFIG).apply(
        {"params": params}, source, lengths, seq2seq.teacher_inputs(tokens)
    )
    np.testing.assert_array_equal(jnp.argmax(logits, -1), tokens)
    np.testing.assert_allclose(forced, weights, atol=1e-6)


def test_padding_is_masked_out():
    params = seq2seq.init_params(CONFIG, 23, seed=4)
    short_tokens, short_weights = DECODE(params, *_batch(23))
    long_source, long_lengths = _batch(37)
    long_source[long_source == dates.PAD] = 5  # garbage in the padding must not matter
    long_tokens, long_weights = DECODE(params, long_source, long_lengths)
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

    cli.main(["translate", "Mittwoch, 25. Nov. 26", "--checkpoint", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "input : Mittwoch, 25. Nov. 26"
    answer = lines[1].removeprefix("output: ")
    assert len(answer) == dates.TARGET_LENGTH and set(answer) <= set(dates.TARGET_CHARS)
    # The header, then one alignment row per output character.
    assert len(lines) == 3 + 1 + dates.TARGET_LENGTH
    # translate answers what the saved model answers.
    params, config, alphabet = seq2seq.load_checkpoint(out)
    source, lengths = dates.encode_sources(["Mittwoch, 25. Nov. 26"], alphabet, 40)
    tokens, _ = seq2seq.make_greedy_decoder(config)(params, source, lengths)
    assert dates.decode_targets(np.asarray(tokens))[0] == answer


def test_translate_without_checkpoint_exits_cleanly(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        cli.main(["translate", "25/11/2026", "--checkpoint", str(tmp_path)])
    with pytest.raises(ValueError, match="at least one character"):
        translate("", tmp_path)


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
