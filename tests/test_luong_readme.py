"""The README's "Luong et al. 2015 in full" examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

SECTION = "## Luong et al. 2015 in full"


def _examples() -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : None if end == -1 else end]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_the_section_has_examples():
    assert len(_examples()) >= 5


# The shapes the examples' comments promise, per example.
EXPECTED = [
    {"context": (2, 3, 6), "alignment": (2, 3, 10), "c_t": (2, 6), "a_t": (2, 10)},
    {"context": (2, 3, 6), "alignment": (2, 3, 10), "h_tilde": (2, 3, 5)},
    {"h_tilde": (2, 7, 8), "alignments": (2, 7, 10)},
    {"logits": (2, 5, 12)},
    {"h_tilde": (2, 7, 8)},
]


@pytest.mark.parametrize("index", range(len(EXPECTED)))
def test_readme_example_runs(index):
    namespace: dict = {}
    exec(compile(_examples()[index], f"README-luong-{index}", "exec"), namespace)
    for name, shape in EXPECTED[index].items():
        assert namespace[name].shape == shape, name
    if "beams" in namespace:
        greedy, beams = namespace["greedy"], namespace["beams"]
        assert greedy.tokens.shape == (2, 6) and beams.tokens.shape == (2, 4, 6)
        assert bool((beams.scores[:, :-1] >= beams.scores[:, 1:]).all())
