"""Learning-rate schedules: the multiplier of each optimizer's base lr at every step of a run.

A study gives every optimizer on a task the same schedule, so the lr search compares optimizers, not schedules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["CONSTANT", "Schedule"]

DECAYS = ("constant", "cosine", "linear", "epoch")


@dataclass(frozen=True)
class Schedule:
    """A linear warm-up over the first ``warmup`` fraction of the steps, then ``decay``:

    - ``constant``: 1;
    - ``cosine``: ``(1 + cos(pi p)) / 2`` at progress ``p`` in [0, 1) through the steps after the warm-up;
    - ``linear``: ``1 - p``;
    - ``epoch``: ``gamma ** k`` in epoch ``k`` (``epoch`` steps each), counted from the first step.
    """

    warmup: float = 0.0
    decay: str = "constant"
    gamma: float = 1.0
    epoch: int = 0

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {self.decay!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be a fraction of the steps in [0, 1), got {self.warmup!r}")
        if self.decay == "epoch" and self.epoch < 1:
            raise ValueError(f"decay='epoch' needs epoch >= 1 steps, got {self.epoch!r}")

    @property
    def name(self) -> str:
        """A short name for file names and tables, e.g. ``warmup5-cosine`` or ``epoch0.9``."""
        decay = f"epoch{self.gamma:g}" if self.decay == "epoch" else self.decay
        return f"warmup{100 * self.warmup:g}-{decay}" if self.warmup else decay

    def describe(self, steps: int) -> str:
        """In words, for tables: ``5% linear warm-up, cosine decay to 0 over 3000 steps``."""
        parts = [f"{100 * self.warmup:g}% linear warm-up"] if self.warmup else []
        parts.append({"constant": "constant lr", "cosine": "cosine decay to 0", "linear": "linear decay to 0",
                      "epoch": f"x{self.gamma:g} per epoch ({self.epoch} steps)"}[self.decay])
        return ", ".join(parts) + f" over {steps} steps"

    def factor(self, step: int, steps: int) -> float:
        """The lr multiplier at ``step`` (0-based) of ``steps``."""
        warm = round(self.warmup * steps)
        if step < warm:
            return (step + 1) / warm
        if self.decay == "epoch":
            return self.gamma ** (step // self.epoch)
        progress = (step - warm) / max(1, steps - warm)
        if self.decay == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.decay == "linear":
            return 1.0 - progress
        return 1.0


CONSTANT = Schedule()
