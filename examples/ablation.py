"""The constraints ablation: Nero with centring on/off and normalisation on/off, on the small CIFAR-10 CNN.

    python examples/ablation.py            # (see examples/results/ablation/)
    python examples/ablation.py --quick

Every variant runs at Nero's default lr 0.01 from three seeds. With normalisation off, each layer's step is
relative to its mean row norm at initialisation instead.
"""

from __future__ import annotations

from harness.loop import Config, describe, run, summarise
from harness.record import Study, markdown_table, parser, score_text
from harness.tasks import cifar_cnn
from tqdm.auto import tqdm

VARIANTS = [(True, True), (True, False), (False, True), (False, False)]
STEPS = {"smoke": 10, "quick": 60, "full": 120}  # at a constant lr (the committed record's budget)


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    study = Study("ablation", args, __file__, argv)
    task = cifar_cnn(study.scale, args.data_dir, steps=STEPS[study.scale])
    seeds = (0,) if study.scale == "smoke" else (0, 1, 2)
    configs = [Config("nero", 0.01, {"centre": c, "normalise": n}) for c, n in VARIANTS]
    runs = [run(task, config, seed) for config in tqdm(configs, disable=not study.progress) for seed in seeds]
    summary = summarise(runs)
    header = ["centre", "normalise", f"{task.metric}, mean ± std over seeds", "diverged"]
    rows = [[r["options"]["centre"], r["options"]["normalise"], score_text(r), r["diverged"]] for r in summary]
    path = study.save({"task": task.name, "task_settings": describe(task), "metric": task.metric, "lr": 0.01,
                       "seeds": list(seeds),
                       "table": [dict(zip(header, r)) for r in rows], "summary": summary, "runs": runs})
    print("\n" + markdown_table(header, rows) + f"\n\nwrote {path}")


if __name__ == "__main__":
    main()
