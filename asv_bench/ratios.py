"""Nero against the optimizers users run today, as ratios measured in one process: the ratio table.

    python asv_bench/ratios.py --quick                      # every shape set and available backend, few rounds
    python asv_bench/ratios.py --shapes gpt2 --backends torch-cpu,jax-cpu --threads 1

A front end to the asv suite: the cases are ``benchmarks/cases.py``'s and the timing ``benchmarks/timing.py``'s,
as in the suite's ratio benchmarks (``track_x_adam``, ``track_x_sgd``) and the regression gate, so a ratio here
means what it means on the dashboard. ``python -m nero_torch.benchmark`` and ``python -m nero_optax.benchmark`` run
this script for one framework.

For each shape set and backend this builds every optimizer, times their steps in interleaved rounds (so that load
on the machine falls on all of them alike) and prints, per optimizer: the median step time, and its ratio to the
framework's best Adam (torch ``fused=True``, jitted ``optax.adam``, the in-place baseline on NumPy/CuPy), to SGD
and to Muon, each the median over rounds of the two times in the same round; the state bytes and their ratio to
Adam's; and the peak extra memory during a step against the largest single parameter. The table is written as
JSON and Markdown (``--out``, default asv_bench/ratios-out/ratios.{json,md}) with the machine it ran on
(``benchmarks/machine.py``: CPU, caches, threads, and the memory bandwidth measured by a copy in the same run).

Host memory is measured in a child process started with glibc's malloc mapping every large block (see
``benchmarks/memory.py``), so that timings here run with the allocator users get.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchmarks import memory, timing  # noqa: E402
from benchmarks.cases import ADAM, BACKENDS, Unavailable, make_case  # noqa: E402
from benchmarks.machine import describe, summary  # noqa: E402
from benchmarks.shapes import SHAPE_SETS, largest_tensor, parameter_count  # noqa: E402
# The issue's targets on the GPT-2-like set, CPU: (backend family, reference, largest allowed ratio).
TARGETS = [("torch", "adam-fused", 0.6), ("torch", "sgd", 1.3), ("jax", "adam", 0.75)]
# The core rule's own targets (issue 24): (backend, its case, reference case, largest allowed ratio of step times).
CORE_TARGETS = [("numpy", "nero", "sgd", 5.0), ("jax-cpu", "nero-core", "nero", 1.5),
                ("torch-cpu", "nero-core", "adam-fused", 3.0)]
# The default path's own targets (issue 22): (shape set, backend, case, reference case, largest allowed ratio).
# nero-torch-kernels (fused=False) is the default path where no C compiler builds the kernel.
DEFAULT_TARGETS = [(shapes, "torch-cpu", case, reference, limit) for case in ("nero", "nero-torch-kernels")
                   for shapes, reference, limit in (("toy194", "adam", 1.5), ("gpt2", "adam-fused", 2.0))]
CORE_EXTRA_TARGET = 2.0  # the NumPy core's peak extra during a step / the largest parameter
STATE_TARGET = 0.005  # Nero's state / Adam's
EXTRA_TARGET = 1.0  # peak extra during a step / the largest parameter


def family(backend: str) -> str:
    return backend.split("-")[0]


def measure_times(shapes: str, backend: str, timing_options: dict) -> tuple[dict, dict]:
    """``({optimizer: {seconds, x_adam, x_sgd, x_muon, state_bytes}}, {optimizer: why it was skipped})`` for one
    shape set and backend; a ratio is None where its reference was skipped."""
    cases, skipped = {}, {}
    for optimizer in BACKENDS[backend]:
        try:
            cases[optimizer] = make_case(backend, optimizer, shapes)
        except Unavailable as exc:
            skipped[optimizer] = str(exc)
    print(f"timing {shapes} on {backend}: {', '.join(cases)}", file=sys.stderr, flush=True)
    samples = timing.interleave({o: c.step for o, c in cases.items()}, **timing_options) if cases else {}

    def x(optimizer: str, reference: str) -> float | None:
        return timing.ratio(samples, optimizer, reference) if reference in samples else None

    times = {o: {"seconds": timing.seconds(samples, o), "x_adam": x(o, ADAM[backend]), "x_sgd": x(o, "sgd"),
                 "x_muon": x(o, "muon"), "state_bytes": c.state_bytes()} for o, c in cases.items()}
    return times, skipped


def measure_memory(shapes: str, backend: str) -> dict[str, dict[str, int]]:
    """``{optimizer: {peak_bytes, extra_bytes}}``, one case alive at a time (call in a memory-only process)."""
    out = {}
    for optimizer in BACKENDS[backend]:
        try:
            case = make_case(backend, optimizer, shapes)
        except Unavailable:
            continue
        peak, extra = case.step_peak()
        out[optimizer] = {"peak_bytes": peak, "extra_bytes": extra}
        del case
        print(f"memory {shapes} {backend} {optimizer}: extra {extra / 2**20:.1f} MiB", file=sys.stderr, flush=True)
    return out


def memory_in_child(shapes: list[str], backends: list[str]) -> dict:
    """Run the memory probes in a child process whose malloc maps every large block."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(memory.MMAP_THRESHOLD))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", "--shapes", ",".join(shapes),
           "--backends", ",".join(backends)]
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        print("memory probe failed (its errors are above); the table has no memory columns", file=sys.stderr)
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def build_rows(shapes: str, backend: str, times: dict, mem: dict) -> list[dict]:
    largest = largest_tensor(shapes).size * 4
    adam_state = times.get(ADAM[backend], {}).get("state_bytes")
    rows = []
    for optimizer, t in times.items():
        extra = mem.get(optimizer, {}).get("extra_bytes")
        rows.append({
            "shapes": shapes, "backend": backend, "optimizer": optimizer, "ms": t["seconds"] * 1e3,
            "x_adam": t["x_adam"], "x_sgd": t["x_sgd"], "x_muon": t["x_muon"], "state_bytes": t["state_bytes"],
            "state_x_adam": ratio(t["state_bytes"], adam_state), "extra_bytes": extra,
            "extra_x_largest": ratio(extra, largest),
        })
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list[dict]) -> str:
    head = ("| shapes | backend | optimizer | ms/step | x Adam | x SGD | x Muon | state MB | state / Adam "
            "| extra MB | extra / largest param |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        extra_mb = None if r["extra_bytes"] is None else r["extra_bytes"] / 2**20
        lines.append(
            f"| {r['shapes']} | {r['backend']} | {r['optimizer']} | {_fmt(r['ms'], '.2f')} "
            f"| {_fmt(r['x_adam'], '.2f')} | {_fmt(r['x_sgd'], '.2f')} | {_fmt(r['x_muon'], '.2f')} "
            f"| {r['state_bytes'] / 2**20:.2f} | {_fmt(r['state_x_adam'], '.4f')} | {_fmt(extra_mb, '.1f')} "
            f"| {_fmt(r['extra_x_largest'], '.2f')} |"
        )
    return "\n".join(lines)


def target_lines(rows: list[dict]) -> list[str]:
    """The issue's targets, checked for every Nero variant on the GPT-2-like set on CPU."""
    out = []
    by_key = {(r["backend"], r["optimizer"]): r for r in rows if r["shapes"] == "gpt2"}
    for (backend, optimizer), r in sorted(by_key.items()):
        if not optimizer.startswith("nero") or backend.endswith(("cuda", "gpu")) or backend == "cupy":
            continue
        core = [t for t in CORE_TARGETS if t[:2] == (backend, optimizer)]
        if core:  # the core rule: its own targets, against the step it must come close to
            _, _, ref, limit = core[0]
            checks = []
            if (backend, ref) in by_key and r["ms"] and by_key[(backend, ref)]["ms"]:
                value = r["ms"] / by_key[(backend, ref)]["ms"]
                checks.append(f"vs {ref} {value:.2f}x (<= {limit}: {'ok' if value <= limit else 'MISS'})")
            if backend == "numpy" and r["extra_x_largest"] is not None:
                ok = r["extra_x_largest"] <= CORE_EXTRA_TARGET
                checks.append(f"extra {r['extra_x_largest']:.2f}x largest param (<= {CORE_EXTRA_TARGET:g}: "
                              f"{'ok' if ok else 'MISS'})")
            out.append(f"- gpt2 {backend} {optimizer} (the core rule): " + "; ".join(checks))
            continue
        checks = []
        for fam, ref, limit in TARGETS:
            if fam == family(backend) and (backend, ref) in by_key:
                value = r["x_sgd"] if ref == "sgd" else r["x_adam"]
                checks.append(f"vs {ref} {value:.2f}x (<= {limit}: {'ok' if value <= limit else 'MISS'})")
        if r["state_x_adam"] is not None:
            ok = r["state_x_adam"] <= STATE_TARGET
            checks.append(f"state {100 * r['state_x_adam']:.3f}% of Adam's (<= 0.5%: {'ok' if ok else 'MISS'})")
        if r["extra_x_largest"] is not None:
            ok = r["extra_x_largest"] <= EXTRA_TARGET
            checks.append(f"extra {r['extra_x_largest']:.2f}x largest param (<= 1: {'ok' if ok else 'MISS'})")
        out.append(f"- gpt2 {backend} {optimizer}: " + "; ".join(checks))
    return out


def default_target_lines(rows: list[dict]) -> list[str]:
    """``Nero(params)``, the default path, against the Adam users would otherwise build (where both were timed)."""
    ms = {(r["shapes"], r["backend"], r["optimizer"]): r["ms"] for r in rows}
    out = []
    for shapes, backend, case, reference, limit in DEFAULT_TARGETS:
        mine, theirs = ms.get((shapes, backend, case)), ms.get((shapes, backend, reference))
        if mine and theirs:
            value = mine / theirs
            out.append(f"- {shapes} {backend} {case} (a default path) vs {reference} {value:.2f}x "
                       f"(<= {limit}: {'ok' if value <= limit else 'MISS'})")
    return out


def set_threads(threads: int) -> None:
    """Run torch and OpenMP kernels (Nero's C kernel) on ``threads`` threads; JAX keeps XLA's own pool."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"3 rounds of ~0.05 s blocks instead of {timing.ROUNDS} of ~{timing.BLOCK_SECONDS} s")
    parser.add_argument("--rounds", type=int, help=f"timing rounds (default {timing.ROUNDS}, --quick 3)")
    parser.add_argument("--threads", type=int, help="OpenMP and torch threads (default: the libraries' own)")
    parser.add_argument("--shapes", default=",".join(SHAPE_SETS), help="comma-separated shape sets")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated backends")
    parser.add_argument("--out", type=Path, default=HERE / "ratios-out" / "ratios", help="writes OUT.json and OUT.md")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.shapes, args.backends = args.shapes.split(","), args.backends.split(",")
    for name in args.shapes:
        if name not in SHAPE_SETS:
            parser.error(f"unknown shape set {name!r}; choose from {list(SHAPE_SETS)}")
    for name in args.backends:
        if name not in BACKENDS:
            parser.error(f"unknown backend {name!r}; choose from {list(BACKENDS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        set_threads(args.threads)
    if args.memory_probe:
        probes = {f"{s}/{b}": measure_memory(s, b) for s in args.shapes for b in args.backends}
        print(json.dumps(probes))
        return 0
    options = {"rounds": 3, "block_seconds": 0.05} if args.quick else {}
    if args.rounds:
        options["rounds"] = args.rounds
    rows, skipped = [], {}
    mem = {} if args.no_memory else memory_in_child(args.shapes, args.backends)
    for shapes in args.shapes:
        for backend in args.backends:
            times, why = measure_times(shapes, backend, options)
            skipped.update({f"{shapes}/{backend}/{o}": reason for o, reason in why.items()})
            rows += build_rows(shapes, backend, times, mem.get(f"{shapes}/{backend}", {}))
            print(f"measured {shapes} on {backend}: {len(times)} optimizers, {len(why)} skipped", file=sys.stderr)
    counts = {s: {"parameters": parameter_count(s), "largest_param_bytes": largest_tensor(s).size * 4}
              for s in args.shapes}
    table = markdown(rows)
    targets = target_lines(rows) + default_target_lines(rows)
    print(table)
    print("\nTargets (CPU):\n" + "\n".join(targets) if targets else "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = describe()
    report = {"machine": machine, "quick": args.quick, "shape_sets": counts, "rows": rows, "skipped": skipped,
              "targets": targets}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(
        f"Measured {machine['date']} ({'quick' if args.quick else 'full'}). Machine: {summary(machine)}\n\n"
        f"{table}\n\n" + "\n".join(targets) + "\n"
    )
    print(f"\nwrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
