"""Table 1 at CPU scale: Nero against SGD, Adam, LAMB and Muon on five tasks across domains.

    python examples/table1.py              # full: every task (see examples/results/table1/)
    python examples/table1.py --quick      # a few minutes
    python examples/table1.py --task ppo_cartpole --task mlp_mnist

Each optimizer runs over the lr grid {1e-4, 1e-3, 1e-2, 1e-1, 1} from seed 0; its best lr, and Nero at its default
0.01, then run from seeds 1 and 2 too. Muon is run as users run it: torch.optim.Muon on the hidden 2-D weights, Adam
(at Adam's best grid lr) on the rest; the CNN has no hidden matrices (torch.optim.Muon takes no conv filters), so
there "muon" is Adam alone (``muon_matrices`` in the record counts them). SGD has momentum 0.9; LAMB is
pytorch_optimizer's.
"""

from __future__ import annotations

import json

from harness.loop import best, describe, summarise, tune
from harness.optim import LR_GRID, NERO_DEFAULT_LR, hidden_matrices
from harness.record import Study, lr_figure, markdown_table, parser, score_text
from harness.tasks import table1_tasks

TASKS = ["mlp_mnist", "cnn_cifar10", "char_lm_shakespeare", "cgan_mnist", "ppo_cartpole"]
OPTIMIZERS = ["nero", "sgd", "adam", "lamb", "muon"]  # adam before muon: muon's adam part takes adam's best lr


def table_rows(task, runs: list[dict]) -> list[list[str]]:
    rows = []
    for name in OPTIMIZERS:
        chosen = best(task, runs, name)
        rows.append([task.name, name, f"{chosen['lr']:g}", score_text(chosen)])
    default = next(r for r in summarise(runs) if r["optimizer"] == "nero" and r["lr"] == NERO_DEFAULT_LR)
    rows.append([task.name, "nero (default lr)", f"{NERO_DEFAULT_LR:g}", score_text(default)])
    return rows


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--task", action="append", choices=TASKS, help="run only this task (repeatable)")
    args = p.parse_args(argv)
    seeds, lrs = ((0, 1), (1e-2,)) if args.smoke else ((0, 1, 2), LR_GRID)
    header = ["task", "optimizer", "best lr", "score (mean ± std over seeds)"]
    tasks = table1_tasks("smoke" if args.smoke else "quick" if args.quick else "full", args.data_dir)
    for name in args.task or TASKS:
        task = tasks[name]
        study = Study(name, args, __file__, argv, folder="table1")
        runs = tune(task, OPTIMIZERS, lrs=lrs, seeds=seeds, progress=study.progress)
        summary = summarise(runs)
        rows = table_rows(task, runs)
        muon_matrices = sum(len(hidden_matrices(m)) for m in task.trial(0).modules.values())
        lines = {o: [r for r in summary if r["optimizer"] == o] for o in OPTIMIZERS}
        study.figure(lr_figure(lines, title=name, ylabel=task.metric, chance=task.chance), name)
        path = study.save({"task": name, "metric": task.metric, "goal": task.goal, "chance": task.chance,
                           "task_settings": describe(task), "optimizers": OPTIMIZERS, "muon_matrices": muon_matrices,
                           "seeds": list(seeds), "lr_grid": list(lrs), "table": [dict(zip(header, r)) for r in rows],
                           "summary": summary, "runs": runs})
        print(f"\n{task.metric}\n" + markdown_table(header, rows) + f"\n\nwrote {path}")
    write_table(study.out)


def write_table(folder) -> None:
    """Gather every task's record in ``folder`` into ``table1.md``."""
    header, rows, walls = None, [], []
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        if "table" not in record:
            continue
        header = list(record["table"][0])
        rows += [list(r.values()) for r in record["table"]]
        walls.append(f"- {record['task']}: {record['metric']}; wall {record['wall_seconds']:.0f} s "
                     f"(CPU {record.get('cpu_seconds', '?')} s); `{record['command']}`")
    if header:
        (folder / "table1.md").write_text(markdown_table(header, rows) + "\n\n" + "\n".join(walls) + "\n")


if __name__ == "__main__":
    main()
