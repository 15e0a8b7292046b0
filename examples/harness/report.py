"""Tables from run records (:mod:`harness.runner`): loading them, score cells, gaps and steps to a target."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .loop import best

__all__ = ["cell", "load_runs", "metric_gap", "steps_to_target"]


def load_runs(folder: Path) -> list[dict]:
    """Every run record under ``folder``; where a task's records were made with different settings (a budget
    changed), only those with the settings of its latest record."""
    runs = []
    for path in sorted(folder.rglob("*.json")):
        record = json.loads(path.read_text())
        if "key" in record:
            runs.append(record)
    latest = {}
    for r in sorted(runs, key=lambda r: r["finished"]):
        latest[r["task"]] = r["settings"]
    return [r for r in runs if r["settings"] == latest[r["task"]]]


def cell(row: dict | None, runs: list[dict], extra: tuple[str, str] | None = None) -> str:
    """A setting's score over its seeds: ``mean ± std (n)``, ``diverged (k of n)`` or ``pending``; with ``extra``
    (a record field and a format), that field's mean over the seeds too."""
    if row is None:
        return "pending"
    n = len(row["seeds"])
    if row["mean"] is None:
        return f"diverged ({row['diverged']} of {n})"
    text = f"{row['mean']:.4g} ± {row['std']:.2g} ({n})" if n > 1 else f"{row['mean']:.4g} (1)"
    if extra:
        field, form = extra
        values = [r[field] for r in runs if r["optimizer"] == row["optimizer"] and r["lr"] == row["lr"]
                  and r["options"] == row["options"] and r.get(field) is not None]
        if values:
            text += "; " + form.format(float(np.mean(values)))
    return text


def metric_gap(nero: dict, top: dict, goal: str, metric: str) -> str:
    """How far ``nero``'s mean is from ``top``'s: in points for an accuracy in %, within 1 point counting as
    level; otherwise relative, within 3% counting as level."""
    if nero["mean"] is None:
        return "diverged"
    ahead = (nero["mean"] - top["mean"]) * (1 if goal == "max" else -1)  # > 0: Nero is better
    if "%" in metric:
        size, unit, level = abs(ahead), "points", abs(ahead) <= 1.0
        amount = f"{size:.2g} {unit}"
    else:
        size = abs(ahead) / abs(top["mean"])
        level = size <= 0.03
        amount = f"{100 * size:.2g}%"
    if level:
        return f"within {'1 point' if '%' in metric else '3%'} ({'ahead' if ahead >= 0 else 'behind'} by {amount})"
    return f"{'ahead' if ahead > 0 else 'behind'} by {amount}"


def first_reach(curve: list[list[float]], target: float) -> float:
    """The first step whose probe is at or below ``target``; infinity where none is."""
    return next((step for step, value in curve if value <= target), math.inf)


def steps_to_target(runs: list[dict], optimizers: tuple[str, ...], default_lr: float) -> str:
    """The steps each optimizer's best setting needs for its validation loss (the probe curve) to reach the
    target, the final validation loss of tuned Adam (its mean over seeds), with a Mann-Whitney U test of Nero
    against Adam and Muon (two-sided; a seed that never reaches the target ranks last)."""
    from scipy.stats import mannwhitneyu

    goal, budget = runs[0]["goal"], runs[0]["settings"]["steps"]
    adam = best(goal, [r for r in runs if r["optimizer"] == "adam"], "adam")
    if adam["mean"] is None:
        return "Tuned Adam diverged: no target."
    target = adam["mean"]
    settings = {name: best(goal, [r for r in runs if r["optimizer"] == name], name)
                for name in optimizers if any(r["optimizer"] == name for r in runs)}
    defaults = [r for r in runs if r["optimizer"] == "nero" and r["lr"] == default_lr]
    if defaults:
        settings["nero (lr 0.01)"] = best(goal, defaults, "nero")
    steps, rows = {}, []
    for label, row in settings.items():
        mine = [r for r in runs if r["optimizer"] == row["optimizer"] and r["lr"] == row["lr"]
                and r["options"] == row["options"]]
        steps[label] = [first_reach(r["probe_curve"], target) if r["score"] is not None else math.inf for r in mine]
        reached = [s for s in steps[label] if math.isfinite(s)]
        spread = (f"{np.median(steps[label]):.0f} ({min(reached):.0f} to {max(steps[label]):.0f})"
                  if len(reached) == len(mine) else
                  f"median {np.median(steps[label]):.0f}" if len(reached) > len(mine) / 2 else "not reached")
        rows.append(f"| {label} | {row['lr']:g} | {len(mine)} | {len(reached)} | {spread} |")
    tests = []
    for nero in ("nero", "nero (lr 0.01)"):
        for other in ("adam", "muon"):
            a, b = steps.get(nero, []), steps.get(other, [])
            if len(a) > 1 and len(b) > 1:
                p = mannwhitneyu(a, b, alternative="two-sided").pvalue
                tests.append(f"- {nero} against {other}: median {np.median(a):.0f} against {np.median(b):.0f} steps, "
                             f"Mann-Whitney U p = {p:.3g} ({len(a)} and {len(b)} seeds)")
    header = ["| optimizer | lr | seeds | seeds that reach it | steps to target: median (fastest to slowest) |",
              "|---|---|---|---|---|"]
    return "\n".join([f"Target: validation loss {target:.4f} nats/char, tuned Adam's (lr {adam['lr']:g}) mean final "
                      f"loss over {len(adam['seeds'])} seeds; budget {budget} steps, probed every "
                      f"{runs[0]['settings'].get('probe_every', '?')} steps. A seed that never reaches the target "
                      "counts as slower than every one that does (inf).", "", *header, *rows, "", *tests])
