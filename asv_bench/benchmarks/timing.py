"""How step times and ratios are measured: interleaved rounds in one process, so that load falls on all alike.

Every figure this project states about speed comes from here: the asv ratio benchmarks (``track_x_adam``,
``track_x_sgd`` in ``bench_step.py``), the ratio table (``asv_bench/ratios.py``, ``python -m nero_torch.benchmark``,
``python -m nero_optax.benchmark``), the regression gate and the spread measurement (``asv_bench/gate.py``).

A measurement (:func:`interleave`) runs ``rounds`` rounds; in each, every step runs a block of about
``block_seconds`` in turn (at least one step), and the round records each one's seconds per step. A step's time
is the median over rounds; a ratio (:func:`ratio`) is the median over rounds of the two steps' times in the same
round. On a shared machine the load changes from second to second, and a ratio of neighbours in time cancels
most of it; a ratio of two medians taken minutes apart does not.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

__all__ = ["BLOCK_SECONDS", "BUDGET_SECONDS", "MIN_ROUNDS", "ROUNDS", "Samples", "interleave", "ratio", "seconds"]

ROUNDS = 15
BLOCK_SECONDS = 0.1
MIN_ROUNDS = 3  # a slow step (STAR on a large set) stops after this many rounds once the budget is spent
BUDGET_SECONDS = 60.0

Samples = dict[str, list[float]]  # seconds per step, per round, of each named step


def _steps_per_block(step: Callable[[], None], block_seconds: float) -> int:
    start = time.perf_counter()
    step()
    return max(1, round(block_seconds / max(time.perf_counter() - start, 1e-7)))


def interleave(
    steps: Mapping[str, Callable[[], None]],
    *,
    rounds: int = ROUNDS,
    block_seconds: float = BLOCK_SECONDS,
    budget_seconds: float = BUDGET_SECONDS,
) -> Samples:
    """Seconds per step of each of ``steps``, one sample per round; rounds stop early (after ``MIN_ROUNDS``) once
    ``budget_seconds`` have passed."""
    per_block = {name: _steps_per_block(step, block_seconds) for name, step in steps.items()}
    samples: Samples = {name: [] for name in steps}
    start = time.perf_counter()
    for done in range(rounds):
        if done >= MIN_ROUNDS and time.perf_counter() - start > budget_seconds:
            break
        for name, step in steps.items():
            n = per_block[name]
            began = time.perf_counter()
            for _ in range(n):
                step()
            samples[name].append((time.perf_counter() - began) / n)
    return samples


def seconds(samples: Samples, name: str) -> float:
    """The median seconds per step of ``name``."""
    return statistics.median(samples[name])


def ratio(samples: Samples, name: str, reference: str) -> float:
    """The median over rounds of ``name``'s step time over ``reference``'s in the same round."""
    return statistics.median(a / b for a, b in zip(samples[name], samples[reference]))
