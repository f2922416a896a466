"""Every Python snippet in the README and in docs/ runs, as a reader would run it, so none can rot.

The snippets of one page run in order in one namespace (a page reads as one session), in a scratch
directory holding the repository's ``examples/``, with the real default model. A comment on a ``print``
line is that line's expected output and must appear in what the page printed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PRINT_WITH_EXPECTATION = re.compile(r"^\s*print\(.*\)\s*#\s*(?P<expected>.+?)\s*$")


def pages() -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def snippets(page: Path) -> list[str]:
    """The ``python`` fenced blocks of ``page``, in order."""
    return [match.group(1) for match in FENCE.finditer(page.read_text(encoding="utf-8"))]


def expected_outputs(code: str) -> list[str]:
    """The expected output written as a comment on each ``print`` line of ``code``."""
    return [m.group("expected") for line in code.splitlines() if (m := PRINT_WITH_EXPECTATION.match(line))]


PAGES_WITH_SNIPPETS = [page for page in pages() if snippets(page)]


def test_the_readme_has_a_python_snippet_to_run():
    assert ROOT / "README.md" in PAGES_WITH_SNIPPETS


def test_snippet_extraction_reads_fences_and_expectations():
    text = "intro\n```python\nx = 1\nprint(x)  # 1\n```\n```bash\nls\n```\n```python\nprint(2)\n```\n"
    blocks = [m.group(1) for m in FENCE.finditer(text)]
    assert blocks == ["x = 1\nprint(x)  # 1\n", "print(2)\n"]
    assert expected_outputs(blocks[0]) == ["1"] and expected_outputs(blocks[1]) == []


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES_WITH_SNIPPETS, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_python_snippet_of_a_page_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__snippet__"}
    for number, code in enumerate(snippets(page), start=1):
        exec(compile(code, f"{page.relative_to(ROOT)} (python snippet {number})", "exec"), namespace)
        printed = capsys.readouterr().out
        for expected in expected_outputs(code):
            assert expected in printed, f"snippet {number} of {page.name} printed {printed!r}, not {expected!r}"
