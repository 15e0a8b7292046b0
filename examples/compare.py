"""Nero, Adam and LAMB side by side on a real task that needs no download: an MLP on scikit-learn's digits.

    python examples/compare.py

Each optimizer runs at its usual default lr (Nero 0.01, Adam 1e-3, LAMB 1e-3; nothing tuned) from three seeds.
Prints a table and saves a plot of the training loss (examples/results/compare/compare.png).
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from harness import data
from harness.loop import Config, describe, run, summarise
from harness.models import mlp
from harness.record import Study, markdown_table, new_figure, parser, score_text
from harness.tasks import Classification

CONFIGS = [Config("nero", 1e-2), Config("adam", 1e-3), Config("lamb", 1e-3)]
SCALES = {"smoke": (100, (0,)), "quick": (400, (0, 1, 2)), "full": (800, (0, 1, 2))}  # steps, seeds


def figure(runs: list[dict]):
    fig, ax = new_figure()
    for config in CONFIGS:
        curves = [np.array(r["loss_curve"]) for r in runs if r["optimizer"] == config.optimizer]
        loss = np.mean([c[:, 1] for c in curves], axis=0)
        ax.plot(curves[0][:, 0], loss, label=f"{config.optimizer} (lr {config.lr:g})")
    ax.set(yscale="log", xlabel="step", ylabel="training loss (minibatch, mean over seeds)",
           title="MLP on scikit-learn digits")
    ax.legend()
    return fig


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    study = Study("compare", args, __file__, argv)
    steps, seeds = SCALES[study.scale]
    task = Classification("mlp_digits", data.digits, lambda: mlp(64, 128, 10, depth=3), steps=steps, batch=64)
    plan = [(config, seed) for config in CONFIGS for seed in seeds]
    runs = []
    for config, seed in tqdm(plan, desc="training", disable=not study.progress):
        runs.append(run(task, config, seed))
    summary = summarise(runs)
    header = ["optimizer", "lr", "test accuracy (%)", "final training loss", "seconds per run"]
    rows = [[r["optimizer"], f"{r['lr']:g}", score_text(r),
             f"{np.mean([x['loss_curve'][-1][1] for x in runs if x['optimizer'] == r['optimizer']]):.3f}",
             f"{np.mean([x['seconds'] for x in runs if x['optimizer'] == r['optimizer']]):.1f}"] for r in summary]
    plot = study.figure(figure(runs), "compare")
    path = study.save({"task_settings": describe(task), "task": task.name, "steps": steps, "seeds": list(seeds),
                       "table": [dict(zip(header, r)) for r in rows], "summary": summary, "runs": runs})
    print(f"\n{len(seeds)} seeds, {steps} steps of batch 64\n" + markdown_table(header, rows)
          + f"\n\nplot: {plot}\nrecord: {path}")
    return summary


if __name__ == "__main__":
    main()
