"""Nero's step time against torch's optimizers: ``python -m nero_torch.benchmark``.

    python -m nero_torch.benchmark                          # the GPT-2-like set (~30M parameters), torch on CPU
    python -m nero_torch.benchmark --threads 1 --shapes gpt2,toy194,single-2048x512

A front end to the ratio table of the benchmark suite (``asv_bench/ratios.py`` in a source checkout), with
``--backends torch-cpu --shapes gpt2`` as defaults; every option of that script is accepted (``--help``). The
cases and the timing are the suite's, so the ratios printed are the ones the asv dashboard and the regression
gate measure, and the table records the machine it ran on.
"""

from __future__ import annotations

import sys

from nero_core._suite import ratio_table, suite_module

__all__ = ["gpt2_like_shapes", "main"]

DEFAULTS = ["--backends", "torch-cpu", "--shapes", "gpt2"]


def gpt2_like_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of the suite's GPT-2-like set (d=512, 8 layers, vocabulary 8192, tied head), torch layout."""
    suite_module("ratios.py")  # puts asv_bench/ on sys.path
    from benchmarks.shapes import shape_set

    return [t.torch_shape for t in shape_set("gpt2")]


def main(argv: list[str] | None = None) -> int:
    return ratio_table(DEFAULTS, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
