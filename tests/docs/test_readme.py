"""Every Python example in the README runs as written.

One exception, by design: the multi-host example needs two cooperating processes; the same
code runs in ``tests/library/multihost_worker.py`` (two processes, ``test_parallel.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
LUONG_SECTION = "## Luong et al. 2015 in full"
MULTI_PROCESS = "# run once per process"


def _examples(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def _luong_section() -> str:
    text = README.read_text()
    start = text.index(LUONG_SECTION)
    end = text.find("\n## ", start + len(LUONG_SECTION))
    return text[start : None if end == -1 else end]


SINGLE_PROCESS = [code for code in _examples(README.read_text()) if MULTI_PROCESS not in code]


def test_the_readme_has_examples():
    assert len(SINGLE_PROCESS) >= 10
    assert len(_examples(_luong_section())) >= 5


@pytest.mark.parametrize("index", range(len(SINGLE_PROCESS)))
def test_readme_example_runs(index):
    exec(compile(SINGLE_PROCESS[index], f"README-{index}", "exec"), {})


# The shapes the Luong section's comments promise, per example.
EXPECTED = [
    {"context": (2, 3, 6), "alignment": (2, 3, 10), "c_t": (2, 6), "a_t": (2, 10)},
    {"context": (2, 3, 6), "alignment": (2, 3, 10), "h_tilde": (2, 3, 5)},
    {"h_tilde": (2, 7, 8), "alignments": (2, 7, 10)},
    {"logits": (2, 5, 12)},
    {"h_tilde": (2, 7, 8)},
]


@pytest.mark.parametrize("index", range(len(EXPECTED)))
def test_luong_example_shapes(index):
    namespace: dict = {}
    exec(compile(_examples(_luong_section())[index], f"README-luong-{index}", "exec"), namespace)
    for name, shape in EXPECTED[index].items():
        assert namespace[name].shape == shape, name
    if "beams" in namespace:
        greedy, beams = namespace["greedy"], namespace["beams"]
        assert greedy.tokens.shape == (2, 6) and beams.tokens.shape == (2, 4, 6)
        assert bool((beams.scores[:, :-1] >= beams.scores[:, 1:]).all())
