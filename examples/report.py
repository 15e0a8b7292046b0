"""Rebuild every study that keeps one record per run (Table 1 with steps to target, the deep MLPs) from its records.

    python examples/report.py            # examples/results/table1/ and examples/results/deep_mlp/
    python examples/report.py --quick    # the same from examples/runs/

Nothing is trained: the tables (``table1.md``, ``steps_to_target.md``, ``deep_mlp.md``) and figures are made from
the run records in each study's ``runs/`` folder alone.
"""

from __future__ import annotations

import sys

import deep_mlp
import table1


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    for study in (table1, deep_mlp):
        study.main(["--report", *argv])


if __name__ == "__main__":
    main()
