"""A lean install: the library without the ``demo`` and ``keras`` extras.

Each case runs a child interpreter whose ``sitecustomize`` puts an import hook first on
``sys.meta_path`` that refuses the named packages, as Python does for a package that is not
installed (``ModuleNotFoundError``), and looks at what the user sees.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import ROOT, SCRIPT, _error_line

from luong_attention.tools import cli

# What an install without any extra lacks. Not optax: the demo imports it, but Flax needs it
# too (flax.nnx imports it), so every install has it.
NO_EXTRAS = ("matplotlib", "tqdm", "keras")

_HOOK = '''import sys


class _Refuse:
    """Refuses the packages of a missing extra, as an install without them would."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _Refuse())
'''


def _without(
    blocked: tuple[str, ...], command: list[str], tmp_path: Path
) -> subprocess.CompletedProcess:
    """Runs ``command`` with ``blocked`` packages refused by a ``sitecustomize`` hook."""
    (tmp_path / "sitecustomize.py").write_text(_HOOK.format(blocked=set(blocked)))
    path = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_library_imports_without_extras_and_the_keras_module_names_its_extra(tmp_path):
    check = """
import luong_attention, luong_attention.luong, luong_attention.decoding, luong_attention.nnx
import luong_attention.keras_compat
for package in ("matplotlib", "tqdm", "keras"):
    try:
        __import__(package)
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"the hook let {package} through")
try:
    import luong_attention.keras
except ModuleNotFoundError as error:
    print(error)
"""
    result = _without(NO_EXTRAS, [sys.executable, "-c", check], tmp_path)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout == (
        'luong_attention.keras needs Keras 3: pip install "luong-attention[keras]"\n'
    )


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_work_without_extras(flag, tmp_path):
    result = _without(NO_EXTRAS, [SCRIPT, flag], tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    if flag == "--help":
        words = " ".join(result.stdout.split())
        for name, command in cli.COMMANDS.items():
            assert f"{name} {command.help} (not installed: pip install" in words


# (refused packages, command line, the extras the error line must ask for)
MISSING = [
    (("matplotlib",), ["demo"], "demo"),
    (("tqdm",), ["demo", "--help"], "demo"),
    (("matplotlib",), ["translate", "25/11/2026"], "demo"),
    (("keras",), ["bench-keras", "--quick"], "keras"),
    (NO_EXTRAS, ["bench", "--quick"], "demo,keras"),
]


@pytest.mark.parametrize(("blocked", "args", "extras"), MISSING, ids=lambda v: str(v)[:30])
def test_a_command_without_its_extra_says_which_to_install(blocked, args, extras, tmp_path):
    line = _error_line(_without(blocked, [SCRIPT, *args], tmp_path))
    assert line.startswith(f"luong-attention {args[0]}: error: this command needs the ")
    assert line.endswith(f'pip install "luong-attention[{extras}]"')


def _extra(name: str) -> set[str]:
    """The distribution names listed in ``pyproject.toml``'s optional dependency ``name``."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    block = re.search(rf"^{name} = \[(.*?)\]", pyproject, flags=re.M | re.S).group(1)
    return set(re.findall(r'"([\w.-]+)', block))


@pytest.mark.parametrize("extra", sorted(cli.EXTRA_PACKAGES))
def test_the_command_lines_extras_are_pyprojects(extra):
    assert set(cli.EXTRA_PACKAGES[extra]) == _extra(extra)


def test_the_long_description_links_absolutely_and_names_real_extras():
    pyproject = (ROOT / "pyproject.toml").read_text()
    readme = re.search(r'^readme = "([^"]+)"', pyproject, flags=re.M).group(1)
    text = (ROOT / readme).read_text()
    # A package index shows the page away from the repository: relative links break there.
    targets = re.findall(r"\]\(([^)]*)\)", text) + re.findall(r'(?:src|href)="([^"]*)"', text)
    assert all(target.startswith("https://") for target in targets), targets
    for extras in re.findall(r"luong-attention\[([\w,]+)\]", text):
        for extra in extras.split(","):
            assert _extra(extra), extra
