"""The tuning protocol: which runs a study does, given the records it has (see :mod:`harness.runner`).

For each optimizer on a task, from seed 0: the lr grid; where the best lr sits on an edge of the grid (strictly
better than its neighbour), one more lr a decade past that edge, repeated, within ``bounds``; then, with ``refine``,
the two half-decade neighbours of the best (x and / sqrt(10)); then the best lr, and Nero at its default, from the
other seeds. Muon's Adam part takes Adam's best seed-0 lr, so Muon's runs wait for Adam's search.
"""

from __future__ import annotations

from dataclasses import dataclass

from .loop import rank
from .runner import Plan, Spec

__all__ = ["Protocol", "best_lr", "tune", "tuning_plan"]


@dataclass(frozen=True)
class Protocol:
    """How one task's optimizers are searched and seeded."""

    optimizers: tuple[str, ...]
    grid: tuple[float, ...]
    seeds: tuple[int, ...]
    default: tuple[str, float] | None = ("nero", 0.01)  # run from every seed whatever the search finds
    refine: bool = False
    extend: bool = True
    bounds: tuple[float, float] = (1e-6, 10.0)
    muon_adam: str = "adam"  # the optimizer whose best lr Muon's Adam part takes


def third_decade(lr: float, up: bool) -> float:
    """``lr`` times (or over) sqrt(10), to 3 significant digits (so 0.01 gives 0.0316 and 0.00316)."""
    return float(f"{lr * 10 ** (0.5 if up else -0.5):.3g}")


def best_lr(scores: dict[float, float | None], goal: str) -> float:
    """The lr with the best score (the smallest lr among equals)."""
    return max(sorted(scores), key=lambda lr: rank(goal, scores[lr]))


def seed0_search(protocol: Protocol, scores: dict[float, float | None], goal: str) -> tuple[list[float], bool]:
    """The seed-0 lrs the search wants given the ``scores`` it has (lr -> score), and whether it is complete."""
    lrs = list(protocol.grid)
    if any(lr not in scores for lr in lrs):
        return lrs, False
    low, high = protocol.bounds
    while protocol.extend:  # a decade past an edge where the best lr sits, strictly ahead of its neighbour
        ordered = sorted(lrs)
        best = best_lr({lr: scores[lr] for lr in ordered}, goal)
        edge = None
        if len(ordered) > 1 and best == ordered[0] and rank(goal, scores[best]) > rank(goal, scores[ordered[1]]):
            edge = float(f"{best / 10:.3g}")
        elif len(ordered) > 1 and best == ordered[-1] and rank(goal, scores[best]) > rank(goal, scores[ordered[-2]]):
            edge = float(f"{best * 10:.3g}")
        if edge is None or not low <= edge <= high:
            break
        lrs.append(edge)
        if edge not in scores:
            return lrs, False
    if protocol.refine:
        best = best_lr({lr: scores[lr] for lr in lrs}, goal)
        neighbours = [third_decade(best, up) for up in (False, True)]
        lrs += [lr for lr in neighbours if lr not in lrs and low <= lr <= high]
        if any(lr not in scores for lr in lrs):
            return lrs, False
    return lrs, True


def tuning_plan(task: str, goal: str, schedule: str, protocol: Protocol, records: dict[str, dict]) -> Plan:
    """The runs ``protocol`` wants on ``task`` given ``records`` (the study's records by key)."""
    plan = Plan()
    chosen: dict[str, float] = {}
    extra_seeds = len(protocol.seeds) - 1
    for name in protocol.optimizers:
        options: tuple = ()
        if name == "muon":
            if protocol.muon_adam not in chosen:
                plan.pending += len(protocol.grid) + (2 if protocol.refine else 0) + extra_seeds
                continue
            options = (("adam_lr", chosen[protocol.muon_adam]),)

        def spec(lr: float, seed: int, phase: int) -> Spec:
            return Spec(task, name, lr, schedule, seed, options, phase)

        scores = {}
        for lr in (*protocol.grid, *(r["lr"] for r in records.values())):
            key = spec(lr, protocol.seeds[0], 0).key
            if key in records:
                scores[lr] = records[key]["score"]
        lrs, complete = seed0_search(protocol, scores, goal)
        phase = 1 if all(lr in scores for lr in protocol.grid) else 0
        plan.ready += [spec(lr, protocol.seeds[0], phase) for lr in lrs if lr not in scores]
        if not complete:
            plan.pending += (2 if protocol.refine and phase == 0 else 0) + extra_seeds
            continue
        chosen[name] = best_lr({lr: scores[lr] for lr in lrs}, goal)
        plan.ready += [spec(chosen[name], seed, 2) for seed in protocol.seeds[1:]]
    if protocol.default is not None:
        name, lr = protocol.default
        plan.ready += [Spec(task, name, lr, schedule, seed, (), 2) for seed in protocol.seeds]
    return plan


def tune(task, protocol: Protocol, progress: bool = False) -> list[dict]:
    """Run ``protocol`` on ``task`` in this process, keeping no record files (a short study's lr search): the
    runs, as :func:`harness.loop.run` gives them, each under its run's ``key``."""
    from tqdm.auto import tqdm

    from .loop import Config, run

    records: dict[str, dict] = {}
    while True:
        new = [s for s in tuning_plan(task.name, task.goal, task.schedule.name, protocol, records).ready
               if s.key not in records]
        if not new:
            return list(records.values())
        for spec in tqdm(new, desc=task.name, disable=not progress, leave=False):
            config = Config(spec.optimizer, spec.lr, dict(spec.options))
            records[spec.key] = {"key": spec.key, **run(task, config, spec.seed, schedule=task.schedule)}
