"""Table 1 at CPU scale: Nero against SGD, Adam, LAMB and Muon on five tasks across domains.

    python examples/table1.py --workers 1     # full: hours of CPU (see examples/results/table1/); resumable
    python examples/table1.py --quick         # minutes
    python examples/table1.py --report        # rebuild the tables and figures from the records alone
    python examples/table1.py --task ppo_cartpole --task mlp_mnist

The protocol (harness.protocol): every optimizer runs over the lr grid {1e-4, 1e-3, 1e-2, 1e-1, 1} from seed 0, the
grid extended by a decade past an edge where the best lr sits, then the two half-decade neighbours of the best; its
best lr, and Nero at its default 0.01, then run from seeds 1 and 2 (1 to 4 on the character transformer, for the
steps-to-target table). Every optimizer trains a task under the same schedule (warm-up and decay, per task: see
harness.tasks.table1_tasks). Muon is run as users run it: torch.optim.Muon on the hidden 2-D weights, Adam (at
Adam's best seed-0 lr) on the rest; the CNN has no hidden matrices (torch.optim.Muon takes no conv filters), so
there "muon" is Adam alone. SGD has momentum 0.9; LAMB is pytorch_optimizer's.

Every run is its own record under ``<out>/runs/``: a study that stops (or is killed) resumes where it was when run
again, and the tables and figures are rebuilt from the records alone.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path


from harness.loop import best, rank, summarise
from harness.optim import LR_GRID, NERO_DEFAULT_LR
from harness.protocol import Protocol, tuning_plan
from harness.record import (Study, curves_figure, lr_figure, markdown_table, pending_figure, runner_parser,
                            save_figure)
from harness.report import cell, load_runs, metric_gap, steps_to_target
from harness.runner import Plan, Tasks, run_study
from harness.tasks import table1_tasks

TASKS = ["mlp_mnist", "cnn_cifar10", "char_lm_shakespeare", "cgan_mnist", "ppo_cartpole"]
OPTIMIZERS = ("nero", "sgd", "adam", "lamb", "muon")  # adam before muon: muon's adam part takes adam's best lr
BASELINES = ("sgd", "adam", "lamb", "muon")
TARGET_TASK = "char_lm_shakespeare"  # the steps-to-target table's task, run from 5 seeds
# CPU seconds of one full-scale run on one thread (measured here), for the ETA until a task has records
ESTIMATE = {"mlp_mnist": 10, "cnn_cifar10": 55, "char_lm_shakespeare": 100, "cgan_mnist": 50, "ppo_cartpole": 25}
MODELS = {  # the models whose records do not say (see harness.models)
    "char_lm_shakespeare": "pre-norm transformer, 2 layers, width 64, 4 heads, context 64",
    "cgan_mnist": "MLP generator 74-256-256-784; MLP discriminator with a class projection",
    "ppo_cartpole": "actor and critic MLPs 4-64-64-out",
}
# what else the table shows of a task's runs: the GAN's samples classified as the class asked for
EXTRA = {"cgan_mnist": ("generated_accuracy", "samples' class accuracy {:.0f}%")}


def protocol(scale: str, task: str) -> Protocol:
    if scale == "smoke":
        return Protocol(OPTIMIZERS, (NERO_DEFAULT_LR,), (0, 1), extend=False)
    if scale == "quick":
        return Protocol(OPTIMIZERS, LR_GRID, (0, 1), extend=False)
    return Protocol(OPTIMIZERS, LR_GRID, (0, 1, 2, 3, 4) if task == TARGET_TASK else (0, 1, 2), refine=True)


def plan(scale: str, names: list[str], tasks: dict, records: dict[str, dict]) -> Plan:
    """Every chosen task's runs, one task after another (the cheapest first, so that a study cut short has whole
    rows), each task's in the order of its protocol's phases."""
    whole = Plan()
    for index, name in enumerate(sorted(names, key=lambda n: ESTIMATE[n])):
        task = tasks[name]
        part = tuning_plan(name, task.goal, task.schedule.name, protocol(scale, name), records)
        part.ready = [replace(spec, phase=10 * index + spec.phase) for spec in part.ready]
        whole += part
    return whole


def rows_of(task: str, runs: list[dict]) -> tuple[list[list[str]], dict]:
    """Table 1's rows for ``task`` (each optimizer's best lr and score over seeds, and Nero at 0.01), and the
    best settings' summaries by row label."""
    goal = runs[0]["goal"]
    extra = EXTRA.get(task)
    chosen, rows = {}, []
    for name in OPTIMIZERS:
        mine = [r for r in runs if r["optimizer"] == name]
        chosen[name] = best(goal, mine, name) if mine else None
    default = [r for r in runs if r["optimizer"] == "nero" and r["lr"] == NERO_DEFAULT_LR]
    chosen["nero (lr 0.01)"] = best(goal, default, "nero") if default else None
    for label, row in chosen.items():
        text = cell(row, runs, extra)
        rows.append([task, label, "pending" if row is None else f"{row['lr']:g}", text])
    return rows, chosen


def verdict(task: str, runs: list[dict], chosen: dict) -> list[str]:
    """Nero at 0.01 against the best tuned baseline: the gap, and whether it is within 1 point (accuracies) or
    3% (losses, distances, returns)."""
    goal, metric = runs[0]["goal"], runs[0]["metric"]
    baselines = [chosen[n] for n in BASELINES if chosen.get(n) and chosen[n]["mean"] is not None]
    default, tuned = chosen.get("nero (lr 0.01)"), chosen.get("nero")
    if not baselines or default is None or tuned is None:
        return [task, metric, "pending", "pending", "pending", "pending"]
    top = max(baselines, key=lambda r: rank(goal, r["mean"]))
    gap = metric_gap(default, top, goal, metric)
    return [task, metric, f"{top['optimizer']} at {top['lr']:g}: {top['mean']:.4g}",
            "diverged" if default["mean"] is None else f"{default['mean']:.4g}", gap,
            f"{tuned['lr']:g}: {tuned['mean']:.4g}" if tuned["mean"] is not None else "diverged"]


def report(folder: Path) -> str:
    """Rebuild ``table1.md``, ``steps_to_target.md`` and the figures in ``folder`` from the records in
    ``folder/runs``; return the Markdown."""
    runs = load_runs(folder / "runs")
    rows, verdicts, budgets = [], [], []
    for task in TASKS:
        mine = [r for r in runs if r["task"] == task]
        if not mine:
            rows.append([task, "all", "pending", "pending"])
            for kind in ("lr", "curves"):
                save_figure(pending_figure(task), folder / f"{task}_{kind}.png")
            continue
        task_rows, chosen = rows_of(task, mine)
        rows += task_rows
        verdicts.append(verdict(task, mine, chosen))
        settings = mine[0]["settings"]
        budget, schedule = budget_text(task, settings).split("; ")
        budgets.append([task, settings.get("architecture", MODELS.get(task)), budget, schedule, mine[0]["metric"],
                        len(mine), f"{sum(r['cpu_seconds'] for r in mine) / 3600:.2f}"])
        figures(folder, task, mine, chosen)
    total = sum(r["cpu_seconds"] for r in runs) / 3600
    text = (markdown_table(["task", "optimizer", "best lr", "score: mean ± std over seeds (seeds)"], rows)
            + "\n\nNero at its default lr 0.01 against the best tuned baseline:\n\n"
            + markdown_table(["task", "metric", "best tuned baseline", "nero at 0.01", "gap", "nero's best lr: score"],
                             verdicts)
            + "\n\nBudgets (every optimizer trains a task under the same schedule; the lr is its peak):\n\n"
            + markdown_table(["task", "model", "budget", "schedule", "metric", "runs", "CPU hours"], budgets)
            + f"\n\n{len(runs)} runs, {total:.2f} CPU hours in all (one thread per run).\n")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "table1.md").write_text(text)
    target = [r for r in runs if r["task"] == TARGET_TASK]
    (folder / "steps_to_target.md").write_text(
        (steps_to_target(target, OPTIMIZERS, NERO_DEFAULT_LR) if target else f"Pending: no {TARGET_TASK} runs yet.")
        + "\n")
    return text


def budget_text(task: str, settings: dict) -> str:
    """A task's budget in its own units (epochs, steps, iterations), and its schedule."""
    steps, schedule = settings["steps"], settings["schedule"].split(" over ")[0]
    if "rollout" in settings:
        return f"{steps} iterations of {settings['rollout']} environment steps; {schedule}"
    images = settings.get("train_size") or (60000 if task.startswith(("mlp", "cgan")) else None)
    if images and task != TARGET_TASK:
        return f"{steps} steps ({steps * settings['batch'] / images:.3g} epochs of {images} images); {schedule}"
    return f"{steps} steps of {settings['batch']} windows; {schedule}"


def figures(folder: Path, task: str, runs: list[dict], chosen: dict) -> None:
    """The lr sensitivity of every optimizer, and the curves of each one's best setting."""
    first = runs[0]
    summary = summarise(runs)
    lines = {name: [r for r in summary if r["optimizer"] == name] for name in OPTIMIZERS}
    save_figure(lr_figure({k: v for k, v in lines.items() if v}, title=task, ylabel=first["metric"],
                          chance=first["chance"], goal=first["goal"]), folder / f"{task}_lr.png")
    groups = {}
    for label, row in chosen.items():
        if row is not None:
            groups[f"{label.split(' (')[0]} lr {row['lr']:g}"] = [
                r for r in runs if r["optimizer"] == row["optimizer"] and r["lr"] == row["lr"]
                and r["options"] == row["options"]]
    probe = {"char_lm_shakespeare": "validation loss (nats/char)", "cgan_mnist": "samples' class accuracy (%)",
             "ppo_cartpole": "training episode return"}.get(task)
    target = None
    if task == TARGET_TASK and chosen.get("adam") and chosen["adam"]["mean"] is not None:
        target = chosen["adam"]["mean"]
    save_figure(curves_figure(groups, title=f"{task}: best setting of each optimizer", probe=probe, target=target),
                folder / f"{task}_curves.png")


def main(argv: list[str] | None = None) -> None:
    p = runner_parser(__doc__.splitlines()[0])
    p.add_argument("--task", action="append", choices=TASKS, help="run only this task (repeatable)")
    args = p.parse_args(argv)
    study = Study("table1", args, __file__, argv)
    if not args.report:
        tasks = Tasks(table1_tasks, study.scale, args.data_dir)
        names = args.task or TASKS
        run_study(tasks, partial(plan, study.scale, names, tasks()), study.out / "runs", workers=args.workers,
                  progress=study.progress, estimate=lambda spec: ESTIMATE[spec.task], kill_after=args.kill_after)
    print(report(study.out))
    print(f"wrote {study.out / 'table1.md'}")


if __name__ == "__main__":
    main()
