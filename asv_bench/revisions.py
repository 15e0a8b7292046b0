"""Past versions of the code, for the history (``history.py``) and the regression gate (``gate.py``).

A version is measured by exporting its commit's tracked files (``git archive``) into a temporary directory and
putting that directory first on ``PYTHONPATH`` (:func:`code_path`), in this environment: nothing in this checkout
changes, and the benchmarks stay this checkout's.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

__all__ = ["RESULTS", "ROOT", "code_path", "exported", "git", "stored_commits"]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


@contextmanager
def exported(commit: str) -> Iterator[Path]:
    """The commit's tracked files in a temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"nero-{commit[:8]}-") as tmp:
        archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        yield Path(tmp)


def code_path(tree: Path) -> str:
    """The ``PYTHONPATH`` that imports the project from ``tree``: its root (nero_core) and adapters/."""
    return os.pathsep.join((str(tree), str(tree / "adapters")))


def stored_commits(machine: str = "*") -> set[str]:
    """Commits with stored asv results (for ``machine``, or any)."""
    return {json.loads(p.read_text()).get("commit_hash", "") for p in RESULTS.glob(f"{machine}/*.json")
            if p.name != "machine.json"}
