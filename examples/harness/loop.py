"""The one training loop, and the learning-rate search built on it.

A task builds a :class:`Trial` per seed: the modules to optimise, one training step, and an evaluation. Every
study, supervised, GAN or PPO, trains through :func:`train`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .optim import LR_GRID, NERO_DEFAULT_LR, make_optimizer

__all__ = ["Config", "Task", "Trial", "best", "describe", "run", "seed_everything", "summarise", "train", "tune"]


@dataclass
class Trial:
    """One training run: ``step(optimizers) -> loss`` is called ``steps`` times, then ``evaluate()``."""

    modules: dict[str, nn.Module]
    step: Callable[[dict[str, Any]], float]
    evaluate: Callable[[], dict[str, float]]
    steps: int


class Task(Protocol):
    name: str
    metric: str  # what ``evaluate()["score"]`` is
    goal: str  # "max" or "min"
    chance: float  # the score of a model that learned nothing

    def trial(self, seed: int) -> Trial: ...


@dataclass(frozen=True)
class Config:
    """An optimizer with one learning rate and its options (e.g. ``centre=False``, Muon's ``adam_lr``)."""

    optimizer: str
    lr: float
    options: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.options.items())
        return f"{self.optimizer} lr={self.lr:g}{extra}"


def describe(task: Task) -> dict:
    """A task's settings for the record: its public number and string attributes (steps, batch, sizes, ...)."""
    simple = (int, float, str, type(None))
    return {k: v for k, v in vars(task).items() if not k.startswith("_") and isinstance(v, simple)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(trial: Trial, make: Callable[[nn.Module], Any], *, points: int = 40, progress: bool = False) -> dict:
    """Train ``trial`` with optimizers from ``make(module)``; stop early when the loss is not finite."""
    optimizers = {name: make(module) for name, module in trial.modules.items()}
    every = max(1, trial.steps // points)
    curve, start = [], time.perf_counter()
    for i in tqdm(range(trial.steps), disable=not progress, leave=False, desc="steps"):
        loss = trial.step(optimizers)
        if not math.isfinite(loss):
            return {"diverged": True, "diverged_at": i, "loss_curve": curve, "seconds": time.perf_counter() - start}
        if i % every == 0 or i == trial.steps - 1:
            curve.append([i + 1, loss])
    with torch.no_grad():
        metrics = trial.evaluate()
    return {"diverged": False, "loss_curve": curve, "seconds": time.perf_counter() - start, **metrics}


def run(task: Task, config: Config, seed: int, *, progress: bool = False) -> dict:
    """One record: ``config`` trained on ``task`` from ``seed``."""
    seed_everything(seed)
    trial = task.trial(seed)
    result = train(trial, lambda m: make_optimizer(config.optimizer, m, config.lr, **config.options), progress=progress)
    if result["diverged"] or not math.isfinite(result.get("score", math.nan)):
        result["score"] = None
    return {"task": task.name, "optimizer": config.optimizer, "lr": config.lr, "options": config.options,
            "seed": seed, **result}


def _rank(task: Task, score: float | None) -> float:
    """Larger is better; a diverged run is worst."""
    if score is None:
        return -math.inf
    return score if task.goal == "max" else -score


def best(task: Task, runs: Sequence[dict], optimizer: str) -> dict:
    """The summary of ``optimizer``'s best learning rate among ``runs``: among the settings run from the most
    seeds, the best mean score."""
    rows = [r for r in summarise(runs) if r["optimizer"] == optimizer]
    return max(rows, key=lambda r: (len(r["seeds"]), _rank(task, r["mean"])))


def summarise(runs: Sequence[dict]) -> list[dict]:
    """Mean and std of the score over seeds, per (optimizer, lr, options)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["optimizer"], r["lr"], repr(sorted(r["options"].items()))), []).append(r)
    rows = []
    for (task, optimizer, lr, _), group in groups.items():
        scores = [r["score"] for r in group if r["score"] is not None]
        rows.append({
            "task": task, "optimizer": optimizer, "lr": lr, "options": group[0]["options"],
            "seeds": [r["seed"] for r in group], "diverged": len(group) - len(scores), "first": group[0]["score"],
            "mean": float(np.mean(scores)) if scores and len(scores) == len(group) else None,
            "std": float(np.std(scores)) if scores and len(scores) == len(group) else None,
        })
    return rows


def tune(task: Task, optimizers: Sequence[str], *, lrs: Sequence[float] = LR_GRID, seeds: Sequence[int] = (0, 1, 2),
         progress: bool = True) -> list[dict]:
    """Every optimizer at every lr from ``seeds[0]``; then the best lr of each, and Nero at its default, from the
    other seeds. Muon's Adam part uses Adam's best lr (so Adam must come before Muon)."""
    runs: list[dict] = []
    bar = tqdm(total=len(optimizers) * len(lrs), desc=task.name, disable=not progress)

    def configs(name: str) -> list[Config]:
        if name == "muon":
            return [Config("muon", lr, {"adam_lr": best(task, runs, "adam")["lr"]}) for lr in lrs]
        return [Config(name, lr) for lr in lrs]

    for name in optimizers:
        for config in configs(name):
            bar.set_postfix_str(config.label())
            runs.append(run(task, config, seeds[0]))
            bar.update()
    bar.close()
    chosen = [best(task, runs, name) for name in optimizers]
    if "nero" in optimizers and not any(c["optimizer"] == "nero" and c["lr"] == NERO_DEFAULT_LR for c in chosen):
        chosen.append(next(r for r in summarise(runs) if r["optimizer"] == "nero" and r["lr"] == NERO_DEFAULT_LR))
    for row in tqdm(chosen, desc=f"{task.name} seeds", disable=not progress or len(seeds) < 2):
        for seed in seeds[1:]:
            runs.append(run(task, Config(row["optimizer"], row["lr"], row["options"]), seed))
    return runs
