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

from .optim import make_optimizer
from .schedule import CONSTANT, Schedule

__all__ = [
    "Config", "Task", "Trial", "best", "describe", "optimizer_groups", "rank", "run", "seed_everything", "summarise",
    "train",
]


@dataclass
class Trial:
    """One training run: ``step(optimizers) -> loss`` is called ``steps`` times, then ``evaluate()``.

    ``probe()``, where given, is a cheap measurement (a validation loss, the return of the last rollouts) taken every
    ``probe_every`` steps during training: the record's ``probe_curve``.
    """

    modules: dict[str, nn.Module]
    step: Callable[[dict[str, Any]], float]
    evaluate: Callable[[], dict[str, float]]
    steps: int
    probe: Callable[[], float] | None = None
    probe_every: int = 0


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
    return {k: v for k, v in vars(task).items()
            if not k.startswith("_") and k != "data_dir" and isinstance(v, simple)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def optimizer_groups(optimizer) -> list[dict]:
    """The param groups of a torch optimizer, or of every optimizer in a :class:`~harness.optim.Chain`."""
    parts = getattr(optimizer, "optimizers", (optimizer,))
    return [group for part in parts for group in part.param_groups]


def train(trial: Trial, make: Callable[[nn.Module], Any], *, schedule: Schedule = CONSTANT, points: int = 100,
          progress: bool = False) -> dict:
    """Train ``trial`` with optimizers from ``make(module)``, every group's lr times ``schedule`` at each step;
    stop early when the loss is not finite. The loss curve holds the mean loss over each of ``points`` spans."""
    optimizers = {name: make(module) for name, module in trial.modules.items()}
    groups = [(group, group["lr"]) for opt in optimizers.values() for group in optimizer_groups(opt)
              if "lr" in group]  # AGD has no lr
    every = max(1, trial.steps // points)
    curve, probes, span = [], [], []
    start, cpu = time.perf_counter(), time.process_time()

    def timing() -> dict:
        return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}

    for i in tqdm(range(trial.steps), disable=not progress, leave=False, desc="steps"):
        factor = schedule.factor(i, trial.steps)
        for group, base in groups:
            group["lr"] = base * factor
        loss = trial.step(optimizers)
        if not math.isfinite(loss):
            return {"diverged": True, "diverged_at": i, "loss_curve": curve, "probe_curve": probes, **timing()}
        span.append(loss)
        if (i + 1) % every == 0 or i == trial.steps - 1:
            curve.append([i + 1, float(np.mean(span))])
            span = []
        if trial.probe is not None and ((i + 1) % trial.probe_every == 0 or i == trial.steps - 1):
            with torch.no_grad():
                probes.append([i + 1, trial.probe()])
    with torch.no_grad():
        metrics = trial.evaluate()
    return {"diverged": False, "loss_curve": curve, "probe_curve": probes, **timing(), **metrics}


def run(task: Task, config: Config, seed: int, *, schedule: Schedule = CONSTANT, progress: bool = False) -> dict:
    """One record: ``config`` trained on ``task`` from ``seed`` under ``schedule``."""
    seed_everything(seed)
    trial = task.trial(seed)
    result = train(trial, lambda m: make_optimizer(config.optimizer, m, config.lr, **config.options),
                   schedule=schedule, progress=progress)
    if result["diverged"] or not math.isfinite(result.get("score", math.nan)):
        result["score"] = None
    return {"task": task.name, "optimizer": config.optimizer, "lr": config.lr, "options": config.options,
            "seed": seed, **result}


def rank(goal: str, score: float | None) -> float:
    """Larger is better (``goal`` is "max" or "min"); a diverged run is worst."""
    if score is None:
        return -math.inf
    return score if goal == "max" else -score


def best(goal: str, runs: Sequence[dict], optimizer: str) -> dict:
    """The summary of ``optimizer``'s best learning rate among ``runs``: among the settings run from the most
    seeds, the best mean score."""
    rows = [r for r in summarise(runs) if r["optimizer"] == optimizer]
    return max(rows, key=lambda r: (len(r["seeds"]), rank(goal, r["mean"])))


def summarise(runs: Sequence[dict]) -> list[dict]:
    """Per (task, optimizer, lr, options): the scores by seed, and their mean and std where no seed diverged."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["optimizer"], r["lr"], repr(sorted(r["options"].items()))), []).append(r)
    rows = []
    for (task, optimizer, lr, _), group in groups.items():
        group = sorted(group, key=lambda r: r["seed"])
        scores = [r["score"] for r in group if r["score"] is not None]
        finished = bool(scores) and len(scores) == len(group)
        rows.append({
            "task": task, "optimizer": optimizer, "lr": lr, "options": group[0]["options"],
            "seeds": [r["seed"] for r in group], "scores": [r["score"] for r in group],
            "diverged": len(group) - len(scores), "first": group[0]["score"],
            "mean": float(np.mean(scores)) if finished else None,
            "std": float(np.std(scores)) if finished else None,
        })
    return rows
