"""Study plumbing: the shared command line, the JSON record (command, versions, wall time) and figures."""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

__all__ = ["Study", "parser", "versions"]

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
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"{stem}.png"
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


def new_figure(size: tuple[float, float] = (5, 3.5)):
    """A matplotlib ``(figure, axes)`` pair drawn off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)


def lr_figure(lines: dict[str, list[dict]], *, title: str, ylabel: str, chance: float | None):
    """The first seed's score against the learning rate, one line per entry of ``lines`` (summary rows);
    an x on the bottom edge marks a diverged run."""
    fig, ax = new_figure()
    for label, rows in lines.items():
        rows = sorted(rows, key=lambda r: r["lr"])
        done = [r for r in rows if r["first"] is not None]
        (line,) = ax.plot([r["lr"] for r in done], [r["first"] for r in done], "o-", label=label)
        failed = [r["lr"] for r in rows if r["first"] is None]
        if failed:
            ax.plot(failed, [ax.get_ylim()[0]] * len(failed), "x", color=line.get_color())
    if chance is not None:
        ax.axhline(chance, color="grey", lw=0.8, ls="--", label="chance")
    ax.set(xscale="log", xlabel="learning rate", ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return fig
