"""Jitted Nero's step time against jitted optax optimizers: ``python -m nero_optax.benchmark``.

    python -m nero_optax.benchmark                          # the GPT-2-like set (~30M parameters), JAX on CPU
    python -m nero_optax.benchmark --shapes mlp,gpt2 --quick

A front end to the ratio table of the benchmark suite (``asv_bench/ratios.py`` in a source checkout), with
``--backends jax-cpu --shapes gpt2`` as defaults; every option of that script is accepted (``--help``). Each step
is ``update`` then ``optax.apply_updates``, jitted with the parameters and state donated, as a training loop runs
it; the cases and the timing are the suite's, so the ratios printed are the ones the asv dashboard and the
regression gate measure, and the table records the machine it ran on.
"""

from __future__ import annotations

import sys

from nero_core._suite import ratio_table

__all__ = ["main"]

DEFAULTS = ["--backends", "jax-cpu", "--shapes", "gpt2"]


def main(argv: list[str] | None = None) -> int:
    return ratio_table(DEFAULTS, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
