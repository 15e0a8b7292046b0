"""Deep plain MLPs on MNIST (ReLU, PyTorch's default init, no normalisation, no skips): which optimizers train?

    python examples/deep_mlp.py            # depths 8, 16, 32, 64 (see examples/results/deep_mlp/)
    python examples/deep_mlp.py --quick

Adam and SGD (momentum 0.9) run over the lr grid {1e-4, ..., 1} from seed 0 at every depth, Nero at its default lr
0.01 only (untuned); a depth "trains" for an optimizer when its best lr beats chance (10%) by a clear margin.
"""

from __future__ import annotations

from harness import data
from harness.loop import best, summarise, tune
from harness.models import mlp
from harness.optim import LR_GRID, NERO_DEFAULT_LR
from harness.record import Study, markdown_table, new_figure, parser, score_text
from harness.tasks import Classification

OPTIMIZERS = ["nero", "adam", "sgd"]
TRAINS = 20.0  # test accuracy (%) above which a run counts as training (chance is 10%)
SCALES = {  # depths, width, steps, training images, lr grid for Adam and SGD
    "smoke": ((4, 8), 32, 30, 2000, (1e-2,)),
    "quick": ((8, 32), 64, 100, None, LR_GRID),
    "full": ((8, 16, 32, 64), 64, 200, None, LR_GRID),
}


def figure(table: dict[int, dict[str, dict]]):
    """Best accuracy against depth per optimizer; an x at the bottom marks a run that diverged."""
    fig, ax = new_figure()
    depths = sorted(table)
    for name in OPTIMIZERS:
        label = f"{name} (lr {NERO_DEFAULT_LR:g})" if name == "nero" else f"{name} (best lr)"
        done = [d for d in depths if table[d][name]["mean"] is not None]
        (line,) = ax.plot(done, [table[d][name]["mean"] for d in done], "o-", label=label)
        failed = [d for d in depths if table[d][name]["mean"] is None]
        if failed:
            ax.plot(failed, [0.0] * len(failed), "x", ms=9, color=line.get_color(), label=f"{name} diverged")
    ax.axhline(10, color="grey", lw=0.8, ls="--", label="chance")
    ax.set(xscale="log", xlabel="depth (linear layers)", ylabel="test accuracy (%)", title="deep plain MLPs, MNIST")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    return fig


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    study = Study("deep_mlp", args, __file__, argv)
    depths, width, steps, size, lrs = SCALES[study.scale]
    runs: list[dict] = []
    table: dict[int, dict[str, dict]] = {}
    for depth in depths:
        task = Classification(f"mlp_depth{depth}",
                              lambda: data.mnist(args.data_dir, train_size=size, test_size=size),
                              lambda depth=depth: mlp(784, width, 10, depth=depth), steps=steps)
        depth_runs = tune(task, ["nero"], lrs=(NERO_DEFAULT_LR,), seeds=(0,), progress=study.progress)
        depth_runs += tune(task, ["adam", "sgd"], lrs=lrs, seeds=(0,), progress=study.progress)
        runs += depth_runs
        table[depth] = {name: best(task, depth_runs, name) for name in OPTIMIZERS}
    header = ["depth"] + [f"{name}: best lr, accuracy (%)" for name in OPTIMIZERS]
    rows = [[d] + [f"{table[d][n]['lr']:g}: {score_text(table[d][n])}" for n in OPTIMIZERS] for d in depths]
    trains = {name: [d for d in depths if (table[d][name]["mean"] or 0) > TRAINS] for name in OPTIMIZERS}
    study.figure(figure(table), "deep_mlp")
    path = study.save({"width": width, "steps": steps, "batch": 128, "train_size": size, "depths": list(depths),
                       "lr_grid": list(lrs), "nero_lr": NERO_DEFAULT_LR,
                       "trains_threshold": TRAINS, "depths_that_train": trains,
                       "table": [dict(zip(header, r)) for r in rows], "summary": summarise(runs), "runs": runs})
    print("\n" + markdown_table(header, rows) + f"\n\ndepths that train (> {TRAINS}%): {trains}\nwrote {path}")


if __name__ == "__main__":
    main()
