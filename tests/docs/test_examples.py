"""Every Python example in the READMEs and in the documentation pages (docs/) runs as written.

One exception, by design: the multi-host example (docs/multi-device.md) needs two cooperating
processes; the same code runs in ``tests/library/parallel/multihost_worker.py`` (two processes,
``test_parallel.py``). Pages that include README sections (``--8<-- "README.md:tour"``) get
those examples tested once, from the README.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "README.pypi.md", *sorted((ROOT / "docs").rglob("*.md"))]
LUONG_PAGE = ROOT / "docs" / "luong.md"
MULTI_PROCESS = "# run once per process"


def _examples(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


EXAMPLES = {
    f"{page.relative_to(ROOT)}-{index}": code
    for page in PAGES
    for index, code in enumerate(_examples(page.read_text(encoding="utf-8")))
    if MULTI_PROCESS not in code
}


def test_the_pages_have_examples():
    for page, count in [
        ("README.md", 2),
        ("README.pypi.md", 1),
        ("docs/keras.md", 1),
        ("docs/luong.md", 5),
        ("docs/performance.md", 1),
        ("docs/multi-device.md", 2),
    ]:
        assert sum(name.startswith(f"{page}-") for name in EXAMPLES) >= count, page


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name):
    exec(compile(EXAMPLES[name], name, "exec"), {})


# The shapes the Luong page's comments promise, per example.
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
    code = _examples(LUONG_PAGE.read_text(encoding="utf-8"))[index]
    exec(compile(code, f"docs/luong.md-{index}", "exec"), namespace)
    for name, shape in EXPECTED[index].items():
        assert namespace[name].shape == shape, name
    if "beams" in namespace:
        greedy, beams = namespace["greedy"], namespace["beams"]
        assert greedy.tokens.shape == (2, 6) and beams.tokens.shape == (2, 4, 6)
        assert bool((beams.scores[:, :-1] >= beams.scores[:, 1:]).all())
