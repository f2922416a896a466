"""Two source trees side by side for before/after benchmarks: an earlier commit's, checked out as a git worktree,
and this checkout's. Each measurement runs in a fresh process with ``PYTHONPATH`` pointing at one tree's ``src``.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def checkout(commit: str) -> Iterator[Path]:
    """The ``src`` directory of ``commit``, checked out in a temporary worktree removed on exit."""
    with tempfile.TemporaryDirectory() as scratch:
        worktree = Path(scratch) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), commit],
                       check=True, capture_output=True)
        try:
            yield worktree / "src"
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)


def head_commit() -> str:
    """This checkout's HEAD, abbreviated."""
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
