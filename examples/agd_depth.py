"""Does automatic gradient descent train deep fully connected networks with no tuning?

    python examples/agd_depth.py --quick    # depths 2, 8, 32 on CIFAR-10 and MNIST, 3 seeds (see results/agd_depth)
    python examples/agd_depth.py            # depths 2 to 32, 2000 steps on the full data, 3 seeds (hours on a CPU)

Fully connected networks of bias-free linear layers (width 256) with ``sqrt(2) * relu`` between them (the factor
keeps the signal's scale through depth under orthogonal weights), cross-entropy loss, batch 128. AGD (gain 1,
nothing tuned) against Adam at 1e-3 and SGD (momentum 0.9) at 0.1, their defaults, and at the best learning rate of
the grid {1e-4, ..., 1} chosen on seed 0. Every optimizer starts from the same weights, AGD's orthogonal
initialisation, so only the optimizer differs. Data: ``--data-dir`` or ``$NERO_DATA_DIR`` (``mnist.npz`` and
``cifar10_jpeg.npz``, fetched and checked when missing).
"""

from __future__ import annotations

import functools

import nero_torch
import torch
from harness import data
from harness.loop import Config, best, run, summarise
from harness.protocol import Protocol, tune
from harness.models import ScaledReLU, mlp
from harness.optim import LR_GRID
from harness.record import Study, markdown_table, new_figure, parser, score_text
from harness.tasks import Classification
from torch import nn

DEFAULT_LR = {"adam": 1e-3, "sgd": 0.1}
METHODS = ("AGD", "Adam default", "Adam best", "SGD default", "SGD best")
SCALES = {  # datasets, depths, width, steps, training (= test) images, lr grid, seeds
    "smoke": (("mnist", "cifar10"), (2, 4), 32, 20, 512, (1e-3, 0.1), (0,)),
    "quick": (("cifar10", "mnist"), (2, 8, 32), 256, 300, 10000, LR_GRID, (0, 1, 2)),
    "full": (("cifar10", "mnist"), (2, 4, 8, 16, 32), 256, 2000, None, LR_GRID, (0, 1, 2)),
}
INPUTS = {"mnist": 784, "cifar10": 3072}


def network(inputs: int, width: int, depth: int) -> nn.Sequential:
    """The bias-free ``sqrt(2) * relu`` MLP, initialised as AGD prescribes from a seed drawn from torch's generator
    (which :func:`harness.loop.run` seeds per run)."""
    model = mlp(inputs, width, 10, depth=depth, linear=functools.partial(nn.Linear, bias=False),
                activation=ScaledReLU)
    nero_torch.AGD(model.parameters()).init_weights(int(torch.randint(2**31 - 1, ())))
    return model


def loader(dataset: str, size: int | None, data_dir):
    def load():
        if dataset == "mnist":
            return data.mnist(data_dir, train_size=size, test_size=size)
        x, y, x_test, y_test = data.cifar10(data_dir, train_size=size, test_size=size)
        return x.flatten(1), y, x_test.flatten(1), y_test

    return load


def depth_runs(task: Classification, lrs, seeds, progress: bool) -> tuple[list[dict], dict[str, dict]]:
    """AGD from every seed; Adam and SGD over ``lrs`` from seed 0, then their best and default lrs from the rest."""
    runs = [run(task, Config("agd", 1.0), seed) for seed in seeds]
    runs += tune(task, Protocol(("adam", "sgd"), tuple(lrs), tuple(seeds), default=None, extend=False), progress)
    for name, lr in DEFAULT_LR.items():
        done = {r["seed"] for r in runs if r["optimizer"] == name and r["lr"] == lr}
        runs += [run(task, Config(name, lr), seed) for seed in seeds if seed not in done]
    rows = summarise(runs)
    chosen = {"AGD": next(r for r in rows if r["optimizer"] == "agd")}
    for name in DEFAULT_LR:
        label = name.replace("adam", "Adam").replace("sgd", "SGD")
        chosen[f"{label} default"] = next(r for r in rows if r["optimizer"] == name and r["lr"] == DEFAULT_LR[name])
        chosen[f"{label} best"] = best(task.goal, runs, name)
    return runs, chosen


def lr_text(method: str, row: dict) -> str:
    return "auto" if method == "AGD" else f"{row['lr']:g}"


def figure(table: dict[str, dict[int, dict[str, dict]]]):
    fig, axes = new_figure((5 * len(table), 3.6))
    fig.clf()
    styles = {"AGD": ("k", "-"), "Adam default": ("C0", "-"), "Adam best": ("C0", "--"),
              "SGD default": ("C1", "-"), "SGD best": ("C1", "--")}
    for i, (dataset, by_depth) in enumerate(table.items()):
        ax = fig.add_subplot(1, len(table), i + 1)
        depths = sorted(by_depth)
        for method, (colour, line) in styles.items():
            rows = [by_depth[d][method] for d in depths]
            ax.errorbar(depths, [r["mean"] if r["mean"] is not None else 0.0 for r in rows],
                        [r["std"] or 0.0 for r in rows], color=colour, ls=line, marker="o", capsize=3, label=method)
        ax.axhline(10, color="grey", lw=0.8, ls=":", label="chance")
        ax.set(xscale="log", xlabel="depth (linear layers)", ylabel="test accuracy (%)", title=dataset)
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.minorticks_off()
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    study = Study("agd_depth", args, __file__, argv)
    datasets, depths, width, steps, size, lrs, seeds = SCALES[study.scale]
    runs: list[dict] = []
    table: dict[str, dict[int, dict[str, dict]]] = {}
    for dataset in datasets:
        load = functools.lru_cache(loader(dataset, size, args.data_dir))
        for depth in depths:
            task = Classification(f"{dataset}_depth{depth}", load,
                                  lambda depth=depth: network(INPUTS[dataset], width, depth), steps=steps,
                                  train_size=size, test_size=size)
            new, chosen = depth_runs(task, lrs, seeds, study.progress)
            runs += new
            table.setdefault(dataset, {})[depth] = chosen
            print(f"{task.name}: " + ", ".join(f"{m} {score_text(r)}" for m, r in chosen.items()), flush=True)
    header = ["dataset", "depth"] + [f"{m} (lr), test acc (%)" for m in METHODS]
    rows = [[dataset, depth] + [f"({lr_text(m, c[m])}) {score_text(c[m])}" for m in METHODS]
            for dataset, by_depth in table.items() for depth, c in by_depth.items()]
    study.figure(figure(table), "agd_depth")
    path = study.save({"width": width, "steps": steps, "batch": 128, "train_size": size, "test_size": size,
                       "depths": list(depths), "datasets": list(datasets), "lr_grid": list(lrs),
                       "default_lr": DEFAULT_LR, "seeds": list(seeds),
                       "table": [dict(zip(header, r)) for r in rows], "summary": summarise(runs), "runs": runs})
    print("\n" + markdown_table(header, rows) + f"\n\nwrote {path}")


if __name__ == "__main__":
    main()
