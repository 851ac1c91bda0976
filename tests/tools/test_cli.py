"""The ``luong-attention`` command line as a user meets it: the real console script in a child
process, its exit status and what it prints; the heatmap helper."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from luong_attention.date_demo import dates, seq2seq, translate
from luong_attention.date_demo.plotting import plot_attention
from luong_attention.tools import cli

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = shutil.which("luong-attention", path=str(Path(sys.executable).parent)) or shutil.which(
    "luong-attention"
)
MAX_LENGTH = 24  # the checkpoint's limit, not the demo's 40: translate must read it
TEXTS = ["Mittwoch, 25. Nov. 26", "12/31/2020", "¿le 1er mars 1999?"]


def _run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    assert SCRIPT, "the luong-attention console script is not installed"
    return subprocess.run(
        [SCRIPT, *args], input=stdin, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small untrained model saved as the demo saves one (translate needs no trained one)."""
    folder = tmp_path_factory.mktemp("model")
    alphabet = dates.source_alphabet()
    config = seq2seq.ModelConfig(
        source_vocab=len(alphabet) + 2,
        embed=5,
        encoder_features=6,
        decoder_features=7,
        max_source_length=MAX_LENGTH,
    )
    seq2seq.save_checkpoint(folder, seq2seq.init_params(config, 9, seed=2), config, alphabet)
    return folder


@pytest.fixture(scope="module")
def damaged(checkpoint, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("damaged")
    shutil.copy(checkpoint / seq2seq.CONFIG_FILE, folder)
    (folder / seq2seq.CHECKPOINT_FILE).write_bytes(b"not msgpack at all")
    return folder


def test_version_is_the_packages():
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, flags=re.MULTILINE).group(1)
    result = _run("--version")
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"luong-attention {version}\n",
        "",
    )


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_of_each_command_shows_an_example(command, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    examples = help_text.split("\nexamples:\n", 1)[1].splitlines()
    assert examples and all(line.startswith(f"  luong-attention {command}") for line in examples)


def _error_line(result: subprocess.CompletedProcess | tuple[int, str, str]) -> str:
    """The one line a user error prints on stderr, after checking status 2 and no stdout."""
    status, stdout, stderr = (
        (result.returncode, result.stdout, result.stderr)
        if isinstance(result, subprocess.CompletedProcess)
        else result
    )
    assert status == 2, stderr
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("luong-attention") and ": error: " in lines[0]
    return lines[0]


# The user errors, each through the console script: (arguments, stdin, words the one
# error line must contain); "{...}" are the fixtures' paths.
SCRIPT_ERRORS = [
    (["demo", "--steps", "0"], "", ["--steps", "at least 1", "0"]),
    (["demo", "--out", "{file}/sub"], "", ["--out", "cannot write"]),
    (["translate", "", "--checkpoint", "{model}"], "", ["text 1 is empty"]),
    (
        ["translate", "--checkpoint", "{model}"],
        "25/11/2026\n" + "x" * (MAX_LENGTH + 1) + "\n",
        ["text 2", f"{MAX_LENGTH + 1} characters", f"at most {MAX_LENGTH}"],
    ),
    (["translate", "25/11/2026", "--checkpoint", "{missing}"], "", ["not found", "demo --out"]),
    (["translate", "25/11/2026", "--checkpoint", "{damaged}"], "", ["not a readable checkpoint"]),
    (["translate", "--bogus", "x"], "", ["luong-attention translate: error: ", "--bogus"]),
    (["bench", "--repeats", "0"], "", ["luong-attention bench: error: ", "--repeats"]),
    (["bench-keras", "--out", "{file}/sub"], "", ["--out", "cannot write"]),
]


def _paths(args: list[str], tmp_path: Path, checkpoint: Path, damaged: Path) -> list[str]:
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    paths = {
        "{file}": str(a_file),
        "{model}": str(checkpoint),
        "{damaged}": str(damaged),
        "{missing}": str(tmp_path / "missing"),
    }
    for placeholder, path in paths.items():
        args = [arg.replace(placeholder, path) for arg in args]
    return args


@pytest.mark.parametrize(("args", "stdin", "words"), SCRIPT_ERRORS, ids=lambda v: str(v)[:40])
def test_user_errors_are_one_line_and_status_2(args, stdin, words, checkpoint, damaged, tmp_path):
    line = _error_line(_run(*_paths(args, tmp_path, checkpoint, damaged), stdin=stdin))
    for word in words:
        assert word in line


# More of the same in this process (the same main(), without the interpreter start-up).
MAIN_ERRORS = [
    (["demo", "--batch-size", "x"], "", ["--batch-size", "integer", "'x'"]),
    (["demo", "--learning-rate", "inf"], "", ["--learning-rate", "positive"]),
    (["demo", "--seed", "-1"], "", ["--seed", "at least 0"]),
    (["demo", "--out", "{file}"], "", ["--out", "cannot write"]),
    (["translate", "25/11/2026", "  ", "--checkpoint", "{model}"], "", ["text 2 is empty"]),
    (["translate", "--checkpoint", "{model}"], "", ["no text"]),
    (["translate", "-", "--checkpoint", "{model}"], " \n\n", ["no text"]),
    (["translate", "25/11/2026", "--checkpoint", "{model}/x.msgpack"], "", ["not found"]),
    (["demo", "--bogus"], "", ["luong-attention demo: error: ", "--bogus"]),
    (["bench", "--only", "nothing", "--out", "{missing}"], "", ["--only nothing", "no row"]),
    (["bench", "--out", "{file}"], "", ["--out", "cannot write"]),
    (["bench-parallel", "--length", "-4"], "", ["--length", "at least 1", "-4"]),
    (["bench-parallel", "--devices", "1", "0"], "", ["--devices", "at least 1"]),
    (["bench-parallel", "--depth", "0"], "", ["--depth", "at least 1"]),
    (["bench-parallel", "--repeats", "many"], "", ["--repeats", "'many'"]),
    (["bench-parallel", "--json", "{file}/rows.json"], "", ["--json", "cannot write"]),
    (["bench-parallel", "--plot", "{file}/sub/m.png"], "", ["--plot", "cannot write"]),
    (["bench-keras", "--lengths", "1024", "0"], "", ["--lengths", "at least 1"]),
    (["bench-keras", "--batch", "0"], "", ["--batch", "at least 1"]),
    (["bench-keras", "--dim", "x"], "", ["--dim", "integer"]),
    (["bench-keras", "--repeats", "0"], "", ["--repeats", "at least 1"]),
    (["no-such-command"], "", ["invalid choice", "'no-such-command'"]),
]


@pytest.mark.parametrize(("args", "stdin", "words"), MAIN_ERRORS, ids=lambda v: str(v)[:40])
def test_more_user_errors_in_process(
    args, stdin, words, checkpoint, damaged, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exited:
        cli.main(_paths(args, tmp_path, checkpoint, damaged))
    captured = capsys.readouterr()
    line = _error_line((exited.value.code, captured.out, captured.err))
    for word in words:
        assert word in line


def _real_date(text: str) -> bool:
    """An independent check: ``datetime`` parses it as YYYY-MM-DD."""
    try:
        return dt.datetime.strptime(text, "%Y-%m-%d").strftime("%Y-%m-%d") == text
    except ValueError:
        return False


def test_translate_batch_json_from_arguments_and_stdin(checkpoint):
    from_args = _run("translate", *TEXTS, "--checkpoint", str(checkpoint), "--json")
    from_stdin = _run(
        "translate", "--checkpoint", str(checkpoint), "--json", stdin="\n".join(TEXTS)
    )
    assert from_args.returncode == 0 and from_args.stderr == ""
    assert from_stdin.stdout == from_args.stdout
    rows = [json.loads(line) for line in from_args.stdout.splitlines()]
    assert [row["input"] for row in rows] == TEXTS
    alphabet = json.loads((checkpoint / seq2seq.CONFIG_FILE).read_text())["alphabet"]
    for row in rows:
        assert len(row["output"]) == dates.TARGET_LENGTH
        assert row["is_date"] == _real_date(row["output"])
        assert row["mean_log_prob"] <= 0
        # The least sure character is at most the geometric mean of all of them.
        assert 0 < row["min_char_prob"] <= np.exp(row["mean_log_prob"]) + 1e-6
        assert row["low_confidence"] == (row["min_char_prob"] < 0.9)
        unknown = [c for c in row["input"] if c not in alphabet]
        assert row["unknown_characters"] == "".join(dict.fromkeys(unknown))
        weights = np.array(row["alignment"])
        assert weights.shape == (dates.TARGET_LENGTH, len(row["input"]))
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-3)
    assert rows[2]["unknown_characters"] == "¿?"  # not in any format's alphabet


def test_translate_reads_stdin_for_dash_skips_blank_lines_and_takes_the_checkpoint_file(
    checkpoint,
):
    texts = ["25/11/2026", "le 1er mars 1999"]
    stdin = f"  {texts[0]}\t\n\n   \n{texts[1]}  \n"
    result = _run(
        "translate",
        "-",
        "--checkpoint",
        str(checkpoint / "checkpoint.msgpack"),
        "--json",
        stdin=stdin,
    )
    assert (result.returncode, result.stderr) == (0, "")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["input"] for row in rows] == texts
    expected = translate.translate(texts, checkpoint)
    assert [row["output"] for row in rows] == [t.answer for t in expected]
    assert [row["mean_log_prob"] for row in rows] == [round(t.confidence, 6) for t in expected]


def test_plot_attention_rejects_non_matrix():
    with pytest.raises(ValueError, match=r"weights must have shape \[q_length, kv_length\]"):
        plot_attention(np.ones((2, 3, 4)))
