"""The benchmark suite of a source checkout (``asv_bench/``), for the adapters' ``python -m ... benchmark`` commands.

The suite measures past commits too, so it is not part of the installed package: it lives beside it in the
repository, and these commands find it there.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

__all__ = ["ratio_table", "suite_module"]

SUITE = Path(__file__).resolve().parents[1] / "asv_bench"


def suite_module(script: str) -> ModuleType:
    """``asv_bench/<script>`` loaded as a module (it puts asv_bench/ on ``sys.path`` for ``benchmarks``)."""
    path = SUITE / script
    if not path.is_file():
        raise SystemExit(f"the benchmarks live in the source repository's asv_bench/, which this installation lacks "
                         f"(looked for {path}): run this from a checkout installed with `pip install -e .[bench]`")
    spec = importlib.util.spec_from_file_location(f"nero_suite_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def ratio_table(defaults: list[str], argv: list[str]) -> int:
    """Run ``asv_bench/ratios.py`` with ``defaults`` followed by ``argv`` (a later option wins)."""
    return suite_module("ratios.py").main([*defaults, *argv])
