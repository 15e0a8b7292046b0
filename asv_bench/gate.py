"""The speed regression gate: fails when Nero's step time, as a ratio to Adam's or SGD's, worsens past a threshold.

    python asv_bench/gate.py                          # this checkout against the last commit with stored results
    python asv_bench/gate.py --baseline main          # against a revision (on a branch: its merge base with main)
    python asv_bench/gate.py spread --processes 10    # each ratio benchmark in 10 processes: the noise to beat

The gate measures the ratio benchmarks of ``GATE`` (``bench_step.<Backend>Ratio.track_x_adam`` and
``track_x_sgd``, the same code and settings as asv runs them) for two versions of the code on this machine, in
the same run: the baseline commit, exported with ``git archive``, and this checkout's working tree (``--code`` to
measure another directory). Each version runs ``--processes`` times, alternating, one process per backend and
version at a time; a process imports the project from its version's directory (``PYTHONPATH``) and the benchmarks
from this checkout. For each case the gate decides on one ratio: a slower Nero step raises its ratio to Adam and
its ratio to SGD by the same factor, so the steadier of the two (the lower threshold) decides, and the other is
reported. The gate fails if a deciding ratio's median over its processes is more than its threshold above the
baseline's, and names the benchmark with both ratios.

Why against a re-measured baseline, not a stored number: a ratio is steadier than a time, but it still moves with
the machine and its load (torch's fused Adam against Nero's kernel differ in how much memory bandwidth limits
them), so the stored result of another hour or machine could trip the gate by itself. The stored results only
say which commit is the baseline: the last one measured (``asv_bench/history.py``).

Each benchmark's threshold comes from its measured spread (``asv_bench/measured/spread.json``, made by the
``spread`` command: the benchmark in 10 separate processes on unchanged code, and the coefficient of variation
(CV) of its ratio): ``SPREADS`` times the CV, and at least ``MIN_THRESHOLD``. The gate compares medians of 3
processes, whose difference spreads about 0.95 CV (for normal noise), so a threshold of 3 CV is passed by unchanged
code in all but about 1 comparison in 1000. ``--threshold`` sets one threshold for all.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from revisions import RESULTS, ROOT, code_path, exported, git, stored_commits

HERE = Path(__file__).resolve().parent
MEASURED = HERE / "measured"

# (backend, shape set, optimizer): the optimized paths a kernel change can slow, on the small set.
GATE = (
    ("torch-cpu", "mlp", "nero-fused-neuron"),
    ("torch-cpu", "mlp", "nero-fused"),
    ("torch-cpu", "mlp", "nero"),
    ("jax-cpu", "mlp", "nero"),
)
SPREADS = 3.0  # a benchmark's threshold: this many times its CV in asv_bench/measured/spread.json ...
MIN_THRESHOLD = 0.15  # ... and at least this (a CV measured in a quiet hour understates a loaded one)
UNMEASURED_THRESHOLD = 0.30  # for a benchmark the spread file lacks
PROCESSES = 3


def thresholds(spread_file: Path = MEASURED / "spread.json") -> dict[str, float]:
    """``{benchmark: largest allowed relative worsening}`` from the measured spread."""
    if not spread_file.is_file():
        return {}
    rows = json.loads(spread_file.read_text())["rows"]
    return {r["benchmark"]: max(MIN_THRESHOLD, SPREADS * r["cv"]) for r in rows}


# --- one process: measure ------------------------------------------------------------------------------------------


def worker(backend: str, cases: list[tuple[str, str]]) -> dict[str, float | None]:
    """``{asv benchmark name: ratio}`` for each (shape set, optimizer) of ``backend``; None where unavailable."""
    sys.path.insert(0, str(HERE))
    from benchmarks import bench_step, timing
    from benchmarks.cases import Unavailable

    ratio_class = next(c for c in vars(bench_step).values()
                       if isinstance(c, type) and issubclass(c, bench_step._Ratio) and c.backend == backend)
    out: dict[str, float | None] = {}
    for shapes, optimizer in cases:
        names = {ref: f"bench_step.{ratio_class.__name__}.track_x_{ref}('{shapes}', '{optimizer}')"
                 for ref in ("adam", "sgd")}
        try:
            steps = bench_step.ratio_steps(backend, optimizer, shapes)
        except Unavailable as exc:
            print(f"{backend} {shapes} {optimizer}: unavailable here ({exc})", file=sys.stderr)
            out.update(dict.fromkeys(names.values()))
            continue
        found = bench_step.ratios(backend, optimizer, timing.interleave(steps))
        out.update({names[ref]: value for ref, value in found.items()})
    return out


def imported_from() -> str:
    """Where this process imports the project from (checked against the directory the gate meant)."""
    import nero_core

    return str(Path(nero_core.__file__).resolve().parents[1])


def measure(code: Path, backend: str, cases: list[tuple[str, str]]) -> dict[str, float | None]:
    """Run :func:`worker` in a fresh process importing the project from ``code``."""
    env = dict(os.environ, PYTHONPATH=code_path(code))
    env.setdefault("OMP_NUM_THREADS", "1")
    spec = ",".join(f"{s}:{o}" for s, o in cases)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "worker", backend, spec],
                          env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the {backend} measurement of {code} failed:\n{done.stderr[-4000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(report["code"]).resolve() != code.resolve():
        raise RuntimeError(f"meant to measure {code}, but the project was imported from {report['code']}")
    return report["ratios"]


def by_backend(cases: tuple[tuple[str, str, str], ...]) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for backend, shapes, optimizer in cases:
        out.setdefault(backend, []).append((shapes, optimizer))
    return out


def collect(codes: dict[str, Path], cases: tuple[tuple[str, str, str], ...], processes: int
            ) -> dict[str, dict[str, list[float]]]:
    """``{version: {benchmark: [ratio per process]}}`` for ``cases`` (backend, shape set, optimizer), the versions
    alternating (and their order swapping)."""
    samples: dict[str, dict[str, list[float]]] = {v: {} for v in codes}
    order = list(codes)
    for i in range(processes):
        for version in order if i % 2 == 0 else order[::-1]:
            for backend, pairs in by_backend(cases).items():
                start = time.perf_counter()
                for name, value in measure(codes[version], backend, pairs).items():
                    if value is not None:
                        samples[version].setdefault(name, []).append(value)
                print(f"  {version} {backend} process {i + 1}/{processes}: {time.perf_counter() - start:.0f} s",
                      file=sys.stderr, flush=True)
    return samples


# --- the gate ------------------------------------------------------------------------------------------------------


def default_baseline() -> str:
    """The newest ancestor of HEAD with stored results (what ``asv_bench/history.py`` measured last)."""
    stored = stored_commits()
    for commit in git("rev-list", "HEAD").split():
        if commit in stored:
            return commit
    raise SystemExit(f"no commit before HEAD has stored results in {RESULTS}: run `make bench-history` "
                     "or name one with --baseline")


def resolve_baseline(revision: str | None) -> str:
    if revision is None:
        return default_baseline()
    commit = git("rev-parse", f"{revision}^{{commit}}")
    head = git("rev-parse", "HEAD")
    return git("merge-base", head, commit) or commit


def deciding(names: list[str], limits: dict[str, float], default: float) -> set[str]:
    """Of each case's ``track_x_adam`` and ``track_x_sgd``, the one with the lower threshold (Adam's on a tie)."""
    cases: dict[str, list[str]] = {}
    for name in names:
        cases.setdefault(name.replace("track_x_adam", "track_x_").replace("track_x_sgd", "track_x_"), []).append(name)
    return {min(group, key=lambda n: (limits.get(n, default), "track_x_sgd" in n)) for group in cases.values()}


def verdicts(samples: dict[str, dict[str, list[float]]], limits: dict[str, float], default: float
             ) -> tuple[list[str], list[str]]:
    """Report lines for every benchmark, and the failures among them (``limits``: thresholds by benchmark)."""
    lines, failures = [], []
    decides = deciding(list(samples["after"]), limits, default)
    for name, after_samples in sorted(samples["after"].items()):
        threshold = limits.get(name, default)
        after = statistics.median(after_samples)
        before_samples = samples["before"].get(name)
        if not before_samples:
            lines.append(f"  new      {name}: {after:.3f} (no baseline: the baseline commit cannot run it)")
            continue
        before = statistics.median(before_samples)
        change = after / before - 1
        if name not in decides:
            lines.append(f"  info     {name}: ratio {before:.3f} before, {after:.3f} after ({change:+.1%}; its "
                         "steadier twin decides)")
            continue
        worse = change > threshold
        line = f"{name}: ratio {before:.3f} before, {after:.3f} after ({change:+.1%}; fails above {threshold:+.0%})"
        lines.append(("  SLOWER   " if worse else "  ok       ") + line)
        if worse:
            failures.append(line)
    return lines, failures


def gate(args: argparse.Namespace) -> int:
    baseline = resolve_baseline(args.baseline)
    code = (args.code or ROOT).resolve()
    limits = {} if args.threshold else thresholds()
    default = args.threshold or UNMEASURED_THRESHOLD
    print(f"speed gate: {code} against {baseline[:12]} ({git('log', '-1', '--format=%s', baseline)[:70]}), "
          f"{args.processes} processes each", flush=True)
    with exported(baseline) as before:
        samples = collect({"before": before, "after": code}, args.cases, args.processes)
    lines, failures = verdicts(samples, limits, default)
    print("\n".join(lines))
    if failures:
        print(f"\nspeed gate FAILED: {len(failures)} ratio benchmark(s) worse than their threshold:\n  "
              + "\n  ".join(failures))
        return 1
    print("\nspeed gate passed: no ratio worse than its threshold")
    return 0


# --- the spread ----------------------------------------------------------------------------------------------------


def spread(args: argparse.Namespace) -> int:
    """Each ratio benchmark of ``--cases`` in ``--processes`` processes on unchanged code (``--baseline``'s commit,
    exported, or else this checkout's working tree): mean, spread, CV."""
    sys.path.insert(0, str(HERE))
    from benchmarks.machine import describe, summary

    load_before = list(os.getloadavg())
    if args.baseline:
        commit = git("rev-parse", f"{args.baseline}^{{commit}}")
        source = f"commit {commit[:8]}, exported"
        with exported(commit) as tree:
            samples = collect({"this": tree}, args.cases, args.processes)["this"]
    else:
        code = (args.code or ROOT).resolve()
        source = f"the working tree at {git('rev-parse', '--short', 'HEAD')}" if code == ROOT else str(code)
        samples = collect({"this": code}, args.cases, args.processes)["this"]
    info = describe()
    info["load_average_before"] = [round(x, 2) for x in load_before]
    rows = []
    for name, values in sorted(samples.items()):
        mean = statistics.fmean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append({"benchmark": name, "processes": len(values), "mean": mean, "stdev": sd, "cv": sd / mean,
                     "min": min(values), "max": max(values), "values": values})
    head = "| benchmark | processes | mean | stdev | CV | min | max |"
    table = [head, "|---|---|---|---|---|---|---|"] + [
        f"| `{r['benchmark']}` | {r['processes']} | {r['mean']:.3f} | {r['stdev']:.3f} | {r['cv']:.1%} "
        f"| {r['min']:.3f} | {r['max']:.3f} |" for r in rows]
    text = (f"Spread of the ratio benchmarks: each in {args.processes} separate processes on unchanged code "
            f"({source}), {info['date']}.\n\n"
            f"Machine: {summary(info)}; load average before the run {info['load_average_before']}.\n\n"
            + "\n".join(table) + "\n")
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": info, "code": source, "rows": rows}, indent=1))
    print(f"wrote {args.out.with_suffix('.md')} and .json", file=sys.stderr)
    return 0


def parse_cases(text: str) -> tuple[tuple[str, str, str], ...]:
    cases = tuple(tuple(item.split(":")) for item in text.split(","))
    bad = [":".join(c) for c in cases if len(c) != 3]
    if bad:
        raise argparse.ArgumentTypeError(f"each case is backend:shapes:optimizer, not {bad}")
    return cases  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:  # internal: python gate.py worker BACKEND shapes:optimizer,...
        cases = [tuple(item.split(":", 1)) for item in argv[2].split(",")]
        print(json.dumps({"code": imported_from(), "ratios": worker(argv[1], cases)}))  # type: ignore[arg-type]
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the measuring processes' threads (recorded by the spread)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=["gate", "spread"], default="gate")
    parser.add_argument("--baseline", help="a git revision (gate default: the newest commit with stored results; "
                                           "spread: measure this commit instead of the working tree)")
    parser.add_argument("--code", type=Path, help="the directory to measure (default: this checkout)")
    parser.add_argument("--processes", type=int, help=f"processes per version (gate {PROCESSES}, spread 10)")
    parser.add_argument("--threshold", type=float,
                        help="largest allowed relative worsening, for all (default: per benchmark, from the spread)")
    parser.add_argument("--cases", type=parse_cases, default=GATE,
                        help="backend:shapes:optimizer,... (default: the gate's, on the mlp set)")
    parser.add_argument("--out", type=Path, default=MEASURED / "spread", help="spread: writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    args.processes = args.processes or (PROCESSES if args.command == "gate" else 10)
    return gate(args) if args.command == "gate" else spread(args)


if __name__ == "__main__":
    sys.exit(main())
