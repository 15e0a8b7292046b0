"""Deep plain MLPs on MNIST (ReLU, PyTorch's default init, no normalisation, no skips): which optimizers train?

    python examples/deep_mlp.py --workers 1   # depths 32, 64, 100 (see examples/results/deep_mlp/); resumable
    python examples/deep_mlp.py --quick
    python examples/deep_mlp.py --report      # rebuild the table and figures from the records alone

The paper's protocol at CPU scale: width 64, 5 epochs of batch 128, the lr decayed by 0.9 per epoch. Every
optimizer (Nero, SGD with momentum 0.9, Adam, LAMB, Muon) runs over the lr grid {1e-4, ..., 1} from seed 0, the grid
extended by a decade past an edge where the best lr sits; a depth "trains" for an optimizer when its best lr beats
chance (10%) by a clear margin (20%).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from harness.loop import best, summarise
from harness.optim import LR_GRID, NERO_DEFAULT_LR
from harness.protocol import Protocol, tuning_plan
from harness.record import Study, lr_figure, markdown_table, new_figure, pending_figure, runner_parser, save_figure
from harness.report import cell, load_runs
from harness.runner import Plan, Tasks, run_study
from harness.tasks import deep_mlp_tasks

OPTIMIZERS = ("nero", "sgd", "adam", "lamb", "muon")
TRAINS = 20.0  # test accuracy (%) above which a run counts as training (chance is 10%)
ESTIMATE = {"mlp_depth32": 20, "mlp_depth64": 45, "mlp_depth100": 100}  # CPU s of one full run (for the ETA)


def protocol(scale: str) -> Protocol:
    grid = (NERO_DEFAULT_LR,) if scale == "smoke" else LR_GRID
    return Protocol(OPTIMIZERS, grid, (0,), extend=scale == "full")


def plan(scale: str, tasks: dict, records: dict[str, dict]) -> Plan:
    whole = Plan()
    for name, task in tasks.items():
        whole += tuning_plan(name, task.goal, task.schedule.name, protocol(scale), records)
    return whole


def depth_of(task: str) -> int:
    return int(task.removeprefix("mlp_depth"))


def figure(table: dict[int, dict[str, dict | None]]):
    """Best accuracy against depth per optimizer (Nero also at 0.01, dashed); an x at the bottom marks a depth where
    every lr diverged."""
    fig, ax = new_figure()
    depths = sorted(table)
    for name in (*OPTIMIZERS, "nero (lr 0.01)"):
        rows = {d: table[d].get(name) for d in depths}
        done = [d for d in depths if rows[d] is not None and rows[d]["mean"] is not None]
        label = name if name.startswith("nero (") else f"{name} (best lr)"
        (line,) = ax.plot(done, [rows[d]["mean"] for d in done], "o--" if name.startswith("nero (") else "o-",
                          label=label)
        failed = [d for d in depths if rows[d] is not None and rows[d]["mean"] is None]
        ax.plot(failed, [0.0] * len(failed), "x", ms=9, color=line.get_color(), ls="none", clip_on=False)
    ax.axhline(10, color="grey", lw=0.8, ls="--", label="chance")
    ax.set(xscale="log", xlabel="depth (linear layers)", ylabel="test accuracy (%)", ylim=(0, 100),
           title="deep plain MLPs, MNIST")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    return fig


def report(folder: Path) -> str:
    """Rebuild ``deep_mlp.md`` and the figures in ``folder`` from the records in ``folder/runs``."""
    runs = load_runs(folder / "runs") if (folder / "runs").is_dir() else []
    if not runs:
        text = "Pending: no runs yet (`python examples/deep_mlp.py` makes them).\n"
        save_figure(pending_figure("deep plain MLPs"), folder / "deep_mlp.png")
        (folder / "deep_mlp.md").write_text(text)
        return text
    depths = sorted({depth_of(r["task"]) for r in runs})
    table: dict[int, dict[str, dict | None]] = {}
    for depth in depths:
        mine = [r for r in runs if r["task"] == f"mlp_depth{depth}"]
        table[depth] = {n: best("max", [r for r in mine if r["optimizer"] == n], n)
                        if any(r["optimizer"] == n for r in mine) else None for n in OPTIMIZERS}
        default = [r for r in mine if r["optimizer"] == "nero" and r["lr"] == NERO_DEFAULT_LR]
        table[depth]["nero (lr 0.01)"] = best("max", default, "nero") if default else None
        summary = summarise(mine)
        save_figure(lr_figure({n: [r for r in summary if r["optimizer"] == n] for n in OPTIMIZERS
                               if any(r["optimizer"] == n for r in summary)},
                              title=f"plain MLP, depth {depth}, MNIST", ylabel="test accuracy (%)", chance=10.0),
                    folder / f"depth{depth}_lr.png")
    columns = (*OPTIMIZERS, "nero (lr 0.01)")
    rows = [[d] + [("pending" if table[d][n] is None else f"{table[d][n]['lr']:g}: {cell(table[d][n], runs)}")
                   for n in columns] for d in depths]
    trains = {n: [d for d in depths if table[d][n] is not None and (table[d][n]["mean"] or 0) > TRAINS]
              for n in columns}
    save_figure(figure(table), folder / "deep_mlp.png")
    first = runs[0]
    cpu = sum(r["cpu_seconds"] for r in runs) / 3600
    text = (markdown_table(["depth"] + [f"{n}: best lr: accuracy (%)" for n in columns], rows)
            + f"\n\nDepths that train (best accuracy > {TRAINS:g}%): "
            + "; ".join(f"{n}: {', '.join(map(str, ds)) or 'none'}" for n, ds in trains.items())
            + f"\n\n{len(runs)} runs, {cpu:.2f} CPU hours (one thread per run); models: "
            + "; ".join(sorted({r["settings"]["architecture"] for r in runs}, key=lambda a: (len(a), a)))
            + "; settings: "
            + ", ".join(f"{k} {v}" for k, v in first["settings"].items() if k not in ("name", "architecture"))
            + "\n")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "deep_mlp.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    args = runner_parser(__doc__.splitlines()[0]).parse_args(argv)
    study = Study("deep_mlp", args, __file__, argv)
    if not args.report:
        tasks = Tasks(deep_mlp_tasks, study.scale, args.data_dir)
        run_study(tasks, partial(plan, study.scale, tasks()), study.out / "runs", workers=args.workers,
                  progress=study.progress, estimate=lambda spec: ESTIMATE.get(spec.task, 30),
                  kill_after=args.kill_after)
    print(report(study.out))
    print(f"wrote {study.out / 'deep_mlp.md'}")


if __name__ == "__main__":
    main()
