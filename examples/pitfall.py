"""The reparameterisation pitfall: Adam on a centred-weight-normalised MLP depends on the raw weights' scale.

    python examples/pitfall.py             # (see examples/results/pitfall/)
    python examples/pitfall.py --quick

Each layer computes ``g * (V - mean V) / |V - mean V| x + b``, so the loss cannot see the scale of the raw
weights ``V ~ N(0, sigma^2)``; Adam's steps are absolute, so they turn the rows by about lr / sigma, and the best lr
moves with sigma. Nero projects ``V`` onto balanced rows at its first step, so sigma leaves it unchanged. Adam and
Nero run over the lr grid from seed 0 at sigma 1 and 100, and at their default lrs (1e-3, 1e-2) from three seeds.
"""

from __future__ import annotations

from functools import partial

from harness import data
from harness.loop import Config, best, run, summarise
from harness.optim import LR_GRID
from harness.models import CentredWeightNormLinear, mlp
from harness.record import Study, lr_figure, markdown_table, parser, score_text
from harness.tasks import Classification
from tqdm.auto import tqdm

SIGMAS = (1.0, 100.0)
DEFAULT_LR = {"adam": 1e-3, "nero": 1e-2}
SCALES = {"smoke": (30, 2000, (1e-3, 1e-2), (0,)), "quick": (200, None, LR_GRID, (0, 1, 2)),
          "full": (600, None, LR_GRID, (0, 1, 2))}  # steps, training images, lr grid, seeds


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    study = Study("pitfall", args, __file__, argv)
    steps, size, lrs, seeds = SCALES[study.scale]
    mnist = data.mnist(args.data_dir, train_size=size, test_size=size)
    runs, rows = [], []
    for sigma in SIGMAS:
        task = Classification(f"cwn_mlp_sigma{sigma:g}", lambda: mnist,
                              lambda: mlp(784, 256, 10, depth=3, linear=partial(CentredWeightNormLinear, sigma=sigma)),
                              steps=steps)
        plan = [(Config(name, lr), seeds[0]) for name in DEFAULT_LR for lr in lrs]
        plan += [(Config(name, lr), seed) for name, lr in DEFAULT_LR.items() for seed in seeds[1:]]
        runs += [run(task, config, seed) for config, seed in tqdm(plan, desc=task.name, disable=not study.progress)]
        summary = [r for r in summarise(runs) if r["task"] == task.name]
        for name, lr in DEFAULT_LR.items():
            default = next(r for r in summary if r["optimizer"] == name and r["lr"] == lr)
            by_lr = {f"{r['lr']:g}": r["first"] for r in summary if r["optimizer"] == name}
            chosen = best(task.goal, [r for r in runs if r["task"] == task.name and r["seed"] == 0], name)
            rows.append([f"{sigma:g}", name, f"{lr:g}: {score_text(default)}", f"{chosen['lr']:g}",
                         ", ".join(f"{k}: {'-' if v is None else f'{v:.1f}'}" for k, v in by_lr.items())])
    summary = summarise(runs)
    lines = {f"{name}, sigma {sigma:g}": [r for r in summary if r["optimizer"] == name
                                          and r["task"] == f"cwn_mlp_sigma{sigma:g}"]
             for name in DEFAULT_LR for sigma in SIGMAS}
    study.figure(lr_figure(lines, title="centred weight norm MLP, MNIST", ylabel="test accuracy (%)", chance=10.0),
                 "pitfall")
    header = ["sigma", "optimizer", "default lr: accuracy (%)", "best lr (seed 0)", "accuracy (%) by lr, seed 0"]
    path = study.save({"sigmas": list(SIGMAS), "default_lr": DEFAULT_LR, "lr_grid": list(lrs), "seeds": list(seeds),
                       "steps": steps, "batch": 128, "width": 256, "train_size": size,
                       "table": [dict(zip(header, r)) for r in rows], "summary": summary,
                       "runs": runs})
    print("\n" + markdown_table(header, rows) + f"\n\nwrote {path}")


if __name__ == "__main__":
    main()
