"""The core rule's speed as ratios, measured in one process (issue 24's targets), on the GPT-2-like set:

* NumPy: ``nero_core.nero`` against an in-place NumPy SGD step and a plain NumPy Adam;
* JAX (CPU), jitted: ``nero_core.nero`` against ``nero_optax.nero``;
* PyTorch (CPU): ``nero_core.nero`` on the tensors against fused Adam;

the cases of the asv suite (``benchmarks/cases.py``), timed as its ratio benchmarks time them
(``benchmarks/timing.py``)::

    python asv_bench/core_ratios.py [--shapes gpt2] [--rounds 15]

The NumPy step's peak extra memory is the ratio table's probe (in a process whose malloc maps large blocks)::

    MALLOC_MMAP_THRESHOLD_=65536 python asv_bench/ratios.py --memory-probe --shapes gpt2 --backends numpy
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmarks import timing  # noqa: E402
from benchmarks.cases import Unavailable, make_case  # noqa: E402

# (backend, the core's case, what it is measured against)
PAIRS = [
    ("numpy", "nero", ("sgd", "adam")),
    ("jax-cpu", "nero-core", ("nero",)),
    ("torch-cpu", "nero-core", ("adam-fused",)),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="gpt2")
    parser.add_argument("--rounds", type=int, default=timing.ROUNDS)
    args = parser.parse_args(argv)
    report: dict[str, object] = {}
    for backend, core, references in PAIRS:
        try:
            cases = {name: make_case(backend, name, args.shapes) for name in (core, *references)}
        except Unavailable as exc:
            print(f"{backend}: skipped ({exc})")
            continue
        samples = timing.interleave({n: c.step for n, c in cases.items()}, rounds=args.rounds)
        for reference in references:
            x = timing.ratio(samples, core, reference)
            spread = sorted(a / b for a, b in zip(samples[core], samples[reference]))
            report[f"{backend}/{core}/x_{reference}"] = x
            print(f"{args.shapes} {backend}: core {1e3 * timing.seconds(samples, core):.1f} ms, "
                  f"{x:.2f}x {reference} ({1e3 * timing.seconds(samples, reference):.1f} ms; "
                  f"rounds {spread[0]:.2f}-{spread[-1]:.2f})", flush=True)
        del cases
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
