"""Nero against the optimizers users run today, as ratios measured in one process.

    python asv_bench/ratios.py --quick                      # every shape set and available backend, few rounds
    python asv_bench/ratios.py --shapes gpt2 --backends torch-cpu,jax-cpu

For each shape set and backend this builds every optimizer in ``benchmarks/cases.py``, times their steps in
interleaved rounds (so that load on the machine falls on all of them alike) and prints, per optimizer: the median
step time and its ratio to the framework's best Adam (torch ``fused=True``, jitted ``optax.adam``, the in-place
baseline on NumPy/CuPy), to SGD and to Muon; the state bytes and their ratio to Adam's; and the peak extra memory
during a step against the largest single parameter. The table is also written as JSON and Markdown (``--out``,
default asv_bench/ratios-out/ratios.{json,md}).

Host memory is measured in a child process started with glibc's malloc mapping every large block (see
``benchmarks/memory.py``), so that timings here run with the allocator users get.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchmarks import memory  # noqa: E402
from benchmarks.cases import BACKENDS, Unavailable, make_case  # noqa: E402
from benchmarks.shapes import SHAPE_SETS, largest_tensor, parameter_count  # noqa: E402

ADAM = {"torch": "adam-fused", "jax": "adam", "numpy": "adam", "cupy": "adam"}
# The issue's targets on the GPT-2-like set, CPU: (backend family, reference, largest allowed ratio).
TARGETS = [("torch", "adam-fused", 0.6), ("torch", "sgd", 1.3), ("jax", "adam", 0.75)]
STATE_TARGET = 0.005  # Nero's state / Adam's
EXTRA_TARGET = 1.0  # peak extra during a step / the largest parameter


def family(backend: str) -> str:
    return backend.split("-")[0]


def time_cases(cases: dict, rounds: int, block_seconds: float) -> dict[str, float]:
    """Median seconds per step of each case, over ``rounds`` interleaved blocks of about ``block_seconds``."""
    per_block = {}
    for name, case in cases.items():
        start = time.perf_counter()
        case.step()
        per_block[name] = max(1, round(block_seconds / max(time.perf_counter() - start, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            n = per_block[name]
            start = time.perf_counter()
            for _ in range(n):
                case.step()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(s) for name, s in samples.items()}


def measure_times(shapes: str, backend: str, rounds: int, block_seconds: float) -> tuple[dict, dict]:
    """``({optimizer: {seconds, state_bytes}}, {optimizer: why it was skipped})`` for one shape set and backend."""
    cases, skipped = {}, {}
    for optimizer in BACKENDS[backend]:
        try:
            cases[optimizer] = make_case(backend, optimizer, shapes)
        except Unavailable as exc:
            skipped[optimizer] = str(exc)
    print(f"timing {shapes} on {backend}: {', '.join(cases)}", file=sys.stderr, flush=True)
    seconds = time_cases(cases, rounds, block_seconds) if cases else {}
    return {o: {"seconds": seconds[o], "state_bytes": c.state_bytes()} for o, c in cases.items()}, skipped


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
    adam, largest = ADAM[family(backend)], largest_tensor(shapes).size * 4
    ref = {name: times.get(name, {}).get("seconds") for name in (adam, "sgd", "muon")}
    adam_state = times.get(adam, {}).get("state_bytes")
    rows = []
    for optimizer, t in times.items():
        extra = mem.get(optimizer, {}).get("extra_bytes")
        rows.append({
            "shapes": shapes, "backend": backend, "optimizer": optimizer, "ms": t["seconds"] * 1e3,
            "x_adam": ratio(t["seconds"], ref[adam]), "x_sgd": ratio(t["seconds"], ref["sgd"]),
            "x_muon": ratio(t["seconds"], ref["muon"]), "state_bytes": t["state_bytes"],
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
        checks = []
        for fam, ref, limit in TARGETS:
            if fam == family(backend) and (backend, ref) in by_key:
                value = r["ms"] / by_key[(backend, ref)]["ms"]
                checks.append(f"vs {ref} {value:.2f}x (<= {limit}: {'ok' if value <= limit else 'MISS'})")
        if r["state_x_adam"] is not None:
            ok = r["state_x_adam"] <= STATE_TARGET
            checks.append(f"state {100 * r['state_x_adam']:.3f}% of Adam's (<= 0.5%: {'ok' if ok else 'MISS'})")
        if r["extra_x_largest"] is not None:
            ok = r["extra_x_largest"] <= EXTRA_TARGET
            checks.append(f"extra {r['extra_x_largest']:.2f}x largest param (<= 1: {'ok' if ok else 'MISS'})")
        out.append(f"- gpt2 {backend} {optimizer}: " + "; ".join(checks))
    return out


def machine() -> dict:
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "load_average": list(os.getloadavg())}
    for module in ("numpy", "torch", "jax", "optax"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            pass
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of ~0.05 s blocks instead of 10 of ~0.3 s")
    parser.add_argument("--rounds", type=int, help="timing rounds (default 10, --quick 3)")
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
    if args.memory_probe:
        probes = {f"{s}/{b}": measure_memory(s, b) for s in args.shapes for b in args.backends}
        print(json.dumps(probes))
        return 0
    rounds, block = (3, 0.05) if args.quick else (10, 0.3)
    rounds = args.rounds or rounds
    rows, skipped = [], {}
    mem = {} if args.no_memory else memory_in_child(args.shapes, args.backends)
    for shapes in args.shapes:
        for backend in args.backends:
            times, why = measure_times(shapes, backend, rounds, block)
            skipped.update({f"{shapes}/{backend}/{o}": reason for o, reason in why.items()})
            rows += build_rows(shapes, backend, times, mem.get(f"{shapes}/{backend}", {}))
            print(f"measured {shapes} on {backend}: {len(times)} optimizers, {len(why)} skipped", file=sys.stderr)
    counts = {s: {"parameters": parameter_count(s), "largest_param_bytes": largest_tensor(s).size * 4}
              for s in args.shapes}
    table = markdown(rows)
    targets = target_lines(rows)
    print(table)
    print("\nTargets (GPT-2-like, CPU):\n" + "\n".join(targets) if targets else "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "quick": args.quick, "shape_sets": counts, "rows": rows, "skipped": skipped,
              "targets": targets}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(
        f"Measured {report['machine']['date']} ({'quick' if args.quick else 'full'}), load average "
        f"{report['machine']['load_average']}\n\n{table}\n\n" + "\n".join(targets) + "\n"
    )
    print(f"\nwrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
