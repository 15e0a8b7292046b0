"""Study plumbing: the shared command line, the JSON record (command, versions, wall time) and figures."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Study", "curves_figure", "lr_figure", "parser", "pending_figure", "runner_parser", "save_figure", "versions",
]

EXAMPLES = Path(__file__).resolve().parents[1]
PACKAGES = ("nero-core", "torch", "numpy", "pytorch_optimizer", "gymnasium", "scikit-learn", "matplotlib")


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def parser(description: str) -> argparse.ArgumentParser:
    """The options every study takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a smaller run that finishes in a few minutes")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # seconds: for the test suite
    p.add_argument("--data-dir", default=None, help="data folder (default $NERO_DATA_DIR or ~/.cache/nero-core)")
    p.add_argument("--out", default=None, help="output folder (default examples/results/<study>, "
                   "or examples/runs/<study> with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def runner_parser(description: str) -> argparse.ArgumentParser:
    """The options of a study made of run records (:mod:`harness.runner`)."""
    p = parser(description)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes, one torch thread each (default: the number of cores)")
    p.add_argument("--report", action="store_true", help="only rebuild the tables and figures from the records")
    p.add_argument("--kill-after", type=int, default=None, help=argparse.SUPPRESS)  # the resume test's SIGKILL
    return p


class Study:
    """Times a study and writes ``<out>/<name>.json`` and figures; ``<out>`` defaults to
    ``examples/results/<folder or name>`` (``examples/runs/...`` below full scale)."""

    def __init__(self, name: str, args: argparse.Namespace, script: str, argv: list[str] | None,
                 folder: str | None = None):
        self.name, self.args = name, args
        argv = sys.argv[1:] if argv is None else argv
        self.command = shlex.join(["python", str(Path(script).resolve().relative_to(EXAMPLES.parent)), *argv])
        self.scale = "smoke" if args.smoke else "quick" if args.quick else "full"
        default = EXAMPLES / ("results" if self.scale == "full" else "runs") / (folder or name)
        self.out = Path(args.out) if args.out else default
        self.progress = not args.no_progress
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        torch.set_num_threads(args.threads)

    def save(self, results: dict) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        record = {
            "study": self.name,
            "scale": self.scale,
            "command": self.command,
            "versions": versions(),
            "torch_threads": torch.get_num_threads(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            # on a shared CPU the wall time includes waiting; the CPU time does not
            "wall_seconds": round(time.perf_counter() - self.start, 1),
            "cpu_seconds": round(time.process_time() - self.cpu_start, 1),
            **results,
        }
        path = self.out / f"{self.name}.json"
        path.write_text(json.dumps(record, indent=1, default=float) + "\n")
        return path

    def figure(self, fig, stem: str) -> Path:
        return save_figure(fig, self.out / f"{stem}.png")


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def score_text(row: dict) -> str:
    if row["mean"] is None:
        return f"diverged ({row['diverged']}/{len(row['seeds'])})"
    return f"{row['mean']:.4g} ± {row['std']:.2g}" if len(row["seeds"]) > 1 else f"{row['mean']:.4g}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def new_figure(size: tuple[float, float] = (5, 3.5), columns: int = 1):
    """A matplotlib ``(figure, axes)`` pair drawn off-screen (``columns`` axes side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=size)


def pending_figure(title: str):
    """A placeholder for a figure whose runs are not done yet (so that pages showing it still build)."""
    fig, ax = new_figure((5.5, 2.0))
    ax.text(0.5, 0.5, f"{title}: pending (no runs yet)", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    return fig


def informative_range(values: list[float], goal: str, chance: float | None) -> tuple[float, float]:
    """The y-range that shows the differences that matter: from the best value to 4 times its distance to the
    median value away, and never further than a little past chance (a loss above chance, an accuracy below it,
    says only that the run failed), so that failed runs do not flatten the rest."""
    values = sorted(values)
    low, high = values[0], values[-1]
    median = values[len(values) // 2]
    if goal == "max":
        floor = high - 4 * (high - median)
        if chance is not None:
            floor = max(floor, chance - 0.1 * (high - chance))
        low = max(low, floor) if high > floor else low
    else:
        ceiling = low + 4 * (median - low)
        if chance is not None:
            ceiling = min(ceiling, chance + 0.1 * (chance - low))
        high = min(high, ceiling) if low < ceiling else high
    pad = 0.05 * (high - low) or 0.05 * abs(high) or 1.0
    return low - pad, high + pad


def lr_figure(lines: dict[str, list[dict]], *, title: str, ylabel: str, chance: float | None, goal: str = "max"):
    """Score against learning rate, one line per entry of ``lines`` (summary rows): the first seed's score at
    every lr, and where a setting ran from several seeds, their mean (a square, shifted a little sideways so that
    lines sharing an lr stay apart) with a bar from the worst to the best seed.

    The y-axis shows the informative range (:func:`informative_range`): a point beyond it is drawn on its edge as
    a triangle, and a run that diverged as an x on the edge of the worse scores."""
    fig, ax = new_figure((5.5, 3.8))
    values = [v for rows in lines.values() for r in rows for v in r.get("scores", [r["first"]]) if v is not None]
    if not values:
        return fig
    low, high = informative_range(values, goal, chance)
    worse = low if goal == "max" else high

    def clip(v: float) -> float:
        return min(max(v, low), high)

    for index, (label, rows) in enumerate(lines.items()):
        shift = 10 ** (0.04 * (index - (len(lines) - 1) / 2))  # side by side where several lines share an lr
        rows = sorted(rows, key=lambda r: r["lr"])
        done = [r for r in rows if r["first"] is not None]
        (line,) = ax.plot([r["lr"] for r in done], [clip(r["first"]) for r in done], "o-", ms=4, label=label)
        colour = line.get_color()
        outside = [r for r in done if clip(r["first"]) != r["first"]]
        ax.plot([r["lr"] for r in outside], [clip(r["first"]) for r in outside], "v" if goal == "max" else "^",
                color=colour, ms=8, ls="none")
        failed = [r["lr"] for r in rows if r["first"] is None]
        ax.plot(failed, [worse] * len(failed), "x", color=colour, ms=8, mew=2, ls="none", clip_on=False)
        for r in rows:
            seeds = [v for v in r.get("scores", []) if v is not None]
            if len(r.get("scores", [])) > 1 and seeds:
                mean = float(np.mean(seeds))
                ax.errorbar([r["lr"] * shift], [clip(mean)], yerr=[[clip(mean) - clip(min(seeds))],
                                                           [clip(max(seeds)) - clip(mean)]],
                            fmt="s", color=colour, ms=6, mfc="white", capsize=3)
    if chance is not None and low <= chance <= high:
        ax.axhline(chance, color="grey", lw=0.8, ls="--", label="chance")
    marks = {"v" if goal == "max" else "^": "beyond the axis", "x": "diverged"}
    for marker, text in marks.items():
        if any(line.get_marker() == marker and len(line.get_xdata()) for line in ax.lines):
            ax.plot([], [], marker, color="grey", ls="none", label=text)
    ax.set(xscale="log", xlabel="learning rate (peak)", ylabel=ylabel, title=title, ylim=(low, high))
    ax.legend(fontsize=7, ncol=2)
    return fig


def curves_figure(groups: dict[str, list[dict]], *, title: str, probe: str | None = None,
                  target: float | None = None):
    """Training-loss curves (and the probe's curve, on a second panel, where the records have one) of each entry of
    ``groups`` (label -> the records of one setting): the mean over seeds, with a band from the lowest to the
    highest seed. Diverged runs are left out of the mean (their label says how many)."""
    panels = 2 if probe else 1
    fig, axes = new_figure((5.5 * panels, 3.8), panels)
    axes = np.atleast_1d(axes)
    for label, records in groups.items():
        finished = [r for r in records if r["score"] is not None]
        name = label + (f" ({len(records) - len(finished)} of {len(records)} diverged)" if len(finished) < len(records)
                        else "")
        for ax, key in zip(axes, ["loss_curve", "probe_curve"]):
            curves = [np.array(r[key]) for r in finished if r.get(key)]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            steps, values = curves[0][:length, 0], np.stack([c[:length, 1] for c in curves])
            (line,) = ax.plot(steps, values.mean(0), label=name)
            if len(curves) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2, lw=0)
    losses = [v for records in groups.values() for r in records for _, v in r.get("loss_curve", [])]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 10:
        axes[0].set_yscale("log")
    axes[0].set(xlabel="step", ylabel="training loss (mean over each span)", title=title)
    axes[0].legend(fontsize=7)
    if probe:
        if target is not None:
            axes[1].axhline(target, color="grey", lw=0.8, ls="--", label="target")
        axes[1].set(xlabel="step", ylabel=probe, title=title)
        axes[1].legend(fontsize=7)
    return fig
