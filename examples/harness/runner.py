"""The study runner: every run is its own record file, so a study can stop at any point and resume.

A study is a set of tasks and a ``plan(records)`` that says which runs to do given the records so far (the lr grid
first, then what depends on it: a grid extended past an edge, finer lrs around the best, more seeds of the best).
The runner loops: plan, hand the runs it has no record of to a pool of worker processes (one torch thread each),
write each finished run's record atomically (a temporary file renamed into place, so a killed study never leaves
half a record), plan again, until the plan asks for nothing new. Rerunning a study skips every run it has a record
of; a run that was cut off is run again from its start (the longest full-scale run takes a few CPU minutes).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .loop import Config, Task, describe, run

__all__ = ["Plan", "Spec", "Tasks", "load_records", "perform", "run_study", "settings"]


@dataclass(frozen=True)
class Spec:
    """One run: a task, an optimizer at one lr (and options, e.g. Muon's ``adam_lr``), a schedule and a seed.
    ``phase`` orders runs in a plan (the grid before what depends on it); it is not part of the run's identity."""

    task: str
    optimizer: str
    lr: float
    schedule: str
    seed: int
    options: tuple[tuple[str, Any], ...] = ()
    phase: int = field(default=0, compare=False)

    @property
    def key(self) -> str:
        """The record's path below the study folder, e.g. ``mlp_mnist/adam_lr0.001_epoch0.9_seed0``."""
        options = "".join(f"_{k}{v:g}" if isinstance(v, float) else f"_{k}{v}" for k, v in self.options)
        return f"{self.task}/{self.optimizer}{options}_lr{self.lr:g}_{self.schedule}_seed{self.seed}"


@dataclass
class Plan:
    """The runs a study wants now (``ready``), and how many more it will want once those are done (``pending``,
    for the progress bar's total)."""

    ready: list[Spec] = field(default_factory=list)
    pending: int = 0

    def __iadd__(self, other: Plan) -> Plan:
        self.ready += other.ready
        self.pending += other.pending
        return self


def settings(task: Task) -> dict:
    """What a record must match to count as a run of ``task`` as it is now (its steps, sizes, schedule)."""
    return {**describe(task), "schedule": task.schedule.describe(task.steps)}


def record_path(folder: Path, key: str) -> Path:
    return folder / f"{key}.json"


def write_atomic(path: Path, record: dict) -> None:
    """Write ``record`` to ``path`` so that no reader, and no kill, ever sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(record, indent=1, default=float) + "\n")
    os.replace(temporary, path)


def load_records(folder: Path, current: dict[str, dict] | None = None) -> dict[str, dict]:
    """Every record under ``folder`` by key. With ``current`` (task name -> :func:`settings`), a record made with
    other settings (an older budget) does not count: the run is done again and its record replaced."""
    records = {}
    for path in sorted(folder.rglob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # not a run record (or unreadable): the run is done again
        if "key" not in record:
            continue
        if current is not None and current.get(record["task"]) != record.get("settings"):
            continue
        records[record["key"]] = record
    return records


def remove_leftovers(folder: Path) -> None:
    """Temporary files of runs that were killed while writing."""
    for path in folder.rglob(".*.tmp"):
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Tasks:
    """A study's tasks, ``build(scale, data_dir)`` by name: a value that a worker process can receive and build
    once (tasks load their data on first use and keep it)."""

    build: Callable[[str, str | None], dict[str, Task]]
    scale: str
    data_dir: str | None = None

    def __call__(self) -> dict[str, Task]:
        if self not in _BUILT:
            _BUILT[self] = self.build(self.scale, self.data_dir)
        return _BUILT[self]


_BUILT: dict[Tasks, dict[str, Task]] = {}


def perform(tasks: Tasks, spec: Spec, folder: str) -> dict:
    """Run ``spec`` (in a worker process) and write its record."""
    task = tasks()[spec.task]
    if task.schedule.name != spec.schedule:
        raise ValueError(f"{spec.key}: the task's schedule is {task.schedule.name}, not {spec.schedule}")
    result = run(task, Config(spec.optimizer, spec.lr, dict(spec.options)), spec.seed, schedule=task.schedule)
    record = {"key": spec.key, **result, "schedule": spec.schedule, "metric": task.metric, "goal": task.goal,
              "chance": task.chance, "settings": settings(task),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pid": os.getpid()}
    write_atomic(record_path(Path(folder), spec.key), record)
    return record


class Inline:
    """An executor that runs each call at submission, in this process (one worker: no processes to start)."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as error:
            future.set_exception(error)
        return future

    def __enter__(self) -> Inline:
        return self

    def __exit__(self, *exc) -> None:
        return None


def one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def executor(workers: int):
    """``workers`` processes of one torch thread each; one worker runs in this process, on its thread count."""
    if workers == 1:
        return Inline()
    os.environ["OMP_NUM_THREADS"] = "1"  # the spawned workers inherit it before they import torch
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=one_thread)


def run_study(tasks: Tasks, plan: Callable[[dict[str, dict]], Plan], folder: Path, *,
              workers: int = 1, progress: bool = True, estimate: Callable[[Spec], float] = lambda spec: 60.0,
              kill_after: int | None = None) -> dict[str, dict]:
    """Run ``plan``'s runs of ``tasks()`` until it asks for nothing new; return every record by key.

    ``estimate(spec)`` is a run's expected CPU seconds where no record of its task says better (for the ETA).
    ``kill_after`` kills this process (SIGKILL) after that many new records: the tests' way to cut a study off.
    """
    folder.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder)
    current = {name: settings(task) for name, task in tasks().items()}
    records = load_records(folder, current)
    found, written = len(records), 0
    bar = tqdm(desc=folder.parent.name, unit="run", disable=not progress, mininterval=5,
               bar_format="{desc}: {n_fmt}/{total_fmt} runs |{bar}| {elapsed}{postfix}")
    with executor(workers) as pool:
        running: dict[Future, Spec] = {}
        failed: dict[str, str] = {}  # key -> error: not tried again in this invocation
        while True:
            wanted = plan(records)
            busy = {spec.key for spec in running.values()} | set(failed)
            unique: dict[str, Spec] = {}
            for spec in wanted.ready:
                unique.setdefault(spec.key, spec)
            todo = sorted((s for k, s in unique.items() if k not in records and k not in busy), key=lambda s: s.phase)
            bar.total = len(records) - found + len(running) + len(todo) + wanted.pending
            bar.set_postfix_str(eta(records, [*running.values(), *todo], wanted.pending, estimate, workers))
            bar.refresh()
            while todo and len(running) < workers:
                spec = todo.pop(0)
                running[pool.submit(perform, tasks, spec, str(folder))] = spec
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                spec = running.pop(future)
                try:
                    record = future.result()
                except Exception as error:  # one broken run must not stop the others: reported at the end
                    failed[spec.key] = f"{type(error).__name__}: {error}"
                    bar.write(f"{spec.key}: failed: {failed[spec.key]}")
                    continue
                records[spec.key] = record
                written += 1
                bar.update()
                if progress:
                    score = "diverged" if record["score"] is None else f"{record['score']:.4g}"
                    bar.write(f"{spec.key}: {score} ({record['cpu_seconds']:.0f} CPU s)")
                if kill_after is not None and written >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    if failed:
        raise RuntimeError(f"{len(failed)} runs failed (rerun to try them again): "
                           + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return records


def eta(records: dict[str, dict], todo: list[Spec], pending: int, estimate: Callable[[Spec], float],
        workers: int) -> str:
    """The remaining CPU time (each run costs what its task's records so far took, else ``estimate``), spread
    over ``workers``."""
    spent: dict[str, list[float]] = {}
    for record in records.values():
        spent.setdefault(record["task"], []).append(record["cpu_seconds"])
    costs = [sum(spent[s.task]) / len(spent[s.task]) if s.task in spent else estimate(s) for s in todo]
    mean = sum(costs) / len(costs) if costs else 0.0
    left = (sum(costs) + pending * mean) / max(1, workers)
    return f"about {left / 3600:.1f} h of CPU time left" if math.isfinite(left) and left else ""
