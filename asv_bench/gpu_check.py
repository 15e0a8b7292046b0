"""The GPU check: the GPU tests, then Nero against the frameworks' own optimizers on the GPT-2-like set, one command.

    python asv_bench/gpu_check.py                       # on a CUDA machine (make gpu-check): about 3 minutes
    python asv_bench/gpu_check.py --device cpu --quick  # the same code path on CPU, small shapes (CI)

1. ``pytest -m gpu`` over :data:`GPU_TESTS` (the Triton kernels on CUDA, nero_optax on a GPU, nero_core on CuPy).
2. Per framework, in a child process of its own (so that one framework's allocator and JAX's uncleared peak counter
   do not colour another's figures), the cases of the asv suite (``benchmarks/cases.py``) on the shape set, timed
   in interleaved rounds (``benchmarks/timing.py``) together with a device-to-device copy:

   - torch: ``Nero(fused=True)`` (the Triton kernels on CUDA) under both non-finite policies and the default
     ``Nero()``, against ``Adam(fused=True)``, ``SGD`` and ``Muon`` (torch's, on the hidden matrices);
   - JAX: jitted ``nero_optax.nero`` against ``optax.adam`` and ``optax.sgd``;
   - CuPy: ``nero_core.nero`` on CuPy arrays against the suite's in-place SGD (and Adam).

   Each step's achieved bandwidth is the traffic an ideal step needs, ``3 x parameter bytes + 2 x state bytes``
   (read ``p`` and ``g``, write ``p``; read and write the state), over its time, and is given as a fraction of the
   copy's (read plus written bytes over its time, measured in the same rounds). Nero's state is one float per
   neuron, so its ideal is SGD's traffic; ``skip_nonfinite="step"`` reads the gradients once more (at most 3/4).
3. The table is written to ``asv_bench/measured/gpt2_gpu.{md,json}`` (``--device cpu``: a temporary folder, unless
   ``--out``), with the device, the versions found and the tests' outcome; the exit status is non-zero when the
   tests failed or a framework's child did.

On a machine without CUDA (``--device cpu``) the same cases run on the CPU backends (torch-cpu, jax-cpu, NumPy),
and the Triton kernels are compiled for a Hopper GPU (sm_90) without one, so that CI catches a kernel Triton would
not compile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX shares the GPU with torch and CuPy

from benchmarks import timing  # noqa: E402
from benchmarks.cases import Unavailable, make_case  # noqa: E402
from benchmarks.shapes import parameter_count  # noqa: E402

GPU_TESTS = ["tests/test_gpu.py"]
# framework: (backend on CUDA, backend on CPU, optimizers; the first Adam-like and "sgd" are the references)
FRAMEWORKS = {
    "torch": ("torch-cuda", "torch-cpu", ("nero-fused", "nero-fused-neuron", "nero", "adam-fused", "sgd", "muon")),
    "jax": ("jax-gpu", "jax-cpu", ("nero", "adam", "sgd")),
    "cupy": ("cupy", "numpy", ("nero", "adam", "sgd")),
}
ADAM = {"torch": "adam-fused", "jax": "adam", "cupy": "adam"}
COPY = "copy"
COPY_MIB = {"cuda": 512, "cpu": 64}  # well past the GPU's L2 (50 MiB on an H100) and a CPU's last-level cache
# The issue's targets on an H100, checked where they apply: (framework, optimizer, reference, most allowed).
TARGETS = [("torch", "nero-fused", "adam-fused", 0.5), ("torch", "nero-fused-neuron", "adam-fused", 0.5),
           ("jax", "nero", "adam", 0.75)]
COPY_TARGET = 0.8  # torch's fused Nero: at least this fraction of the copy's bandwidth


# ---- one framework, in a child process ---------------------------------------------------------------------------


def _copy_step(framework: str, device: str, mib: int):
    """A step that copies ``mib`` MiB from one buffer of the device to another, finished when it returns."""
    n = mib * 2**20 // 4
    if framework == "torch":
        import torch

        src = torch.ones(n, device=device)
        dst = torch.empty_like(src)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def step() -> None:
            dst.copy_(src)
            sync()

        return step
    if framework == "jax":
        import jax
        import numpy as np

        x = jax.device_put(np.ones(n, np.float32), jax.devices("gpu" if device == "cuda" else "cpu")[0])
        add = jax.jit(lambda a: a + 1.0)  # a copy XLA cannot elide: each element read once and written once
        return lambda: add(x).block_until_ready()
    if device == "cuda":
        import cupy as xp

        sync = xp.cuda.Device().synchronize
    else:
        import numpy as xp

        def sync() -> None:
            return None

    src = xp.ones(n, dtype=xp.float32)
    dst = xp.empty_like(src)

    def copy() -> None:
        xp.copyto(dst, src)
        sync()

    return copy


def measure(framework: str, device: str, shapes: str, options: dict) -> dict:
    """Every optimizer of ``framework`` on ``shapes``, interleaved with the copy: times, ratios, bandwidths."""
    backend = FRAMEWORKS[framework][0 if device == "cuda" else 1]
    cases, skipped = {}, {}
    for optimizer in FRAMEWORKS[framework][2]:
        try:
            cases[optimizer] = make_case(backend, optimizer, shapes)
        except Unavailable as exc:
            skipped[optimizer] = str(exc)
    param_bytes = 4 * parameter_count(shapes)  # float32 parameters (cases.py)
    copy_bytes = 2 * COPY_MIB[device] * 2**20
    state = {name: case.state_bytes() for name, case in cases.items()}
    peaks = {name: case.step_peak() for name, case in cases.items()} if device == "cuda" else {}
    steps = {name: case.step for name, case in cases.items()}
    steps[COPY] = _copy_step(framework, device, COPY_MIB[device])
    samples = timing.interleave(steps, **options)
    copy_rate = copy_bytes / timing.seconds(samples, COPY)
    rows = []
    for name in cases:
        seconds = timing.seconds(samples, name)
        traffic = 3 * param_bytes + 2 * state[name]
        rows.append({
            "framework": framework, "backend": backend, "optimizer": name, "ms": seconds * 1e3,
            "x_adam": timing.ratio(samples, name, ADAM[framework]) if ADAM[framework] in cases else None,
            "x_sgd": timing.ratio(samples, name, "sgd") if "sgd" in cases else None,
            "x_muon": timing.ratio(samples, name, "muon") if "muon" in cases else None,
            "traffic_bytes": traffic, "gb_per_s": traffic / seconds / 1e9,
            "x_copy_bandwidth": timing.ratio(samples, COPY, name) * traffic / copy_bytes,
            "state_bytes": state[name], "peak_bytes": peaks.get(name, (None, None))[0],
            "extra_bytes": peaks.get(name, (None, None))[1] if framework != "jax" else None,
        })
    return {"framework": framework, "backend": backend, "copy_gb_per_s": copy_rate / 1e9, "rows": rows,
            "skipped": skipped, "versions": _versions()}


def _versions() -> dict:
    """The versions of what this child imported, and where nero-core was imported from."""
    found = {}
    for module in ("nero_core", "torch", "triton", "jax", "jaxlib", "optax", "cupy", "numpy"):
        if module in sys.modules:
            found[module] = getattr(sys.modules[module], "__version__", "?")
    if "nero_core" in sys.modules:
        found["nero_core"] += f" ({Path(sys.modules['nero_core'].__file__).parent.parent})"
    return found


# ---- the parent: tests, children, the table ----------------------------------------------------------------------


def run_tests(device: str) -> dict:
    """``pytest -m gpu`` over GPU_TESTS (on a machine without CUDA they skip: the check still runs them)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", *GPU_TESTS]
    env = dict(os.environ)
    if device == "cuda":
        env.pop("TRITON_INTERPRET", None)
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    print(done.stdout[-4000:], done.stderr[-2000:], sep="\n", file=sys.stderr)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {"command": " ".join(["pytest", *cmd[3:]]), "returncode": done.returncode,
            "summary": lines[-1] if lines else "", "seconds": round(time.perf_counter() - started, 1)}


def run_child(framework: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        cmd = [sys.executable, __file__, "--child", framework, "--device", args.device, "--shapes", args.shapes,
               "--child-out", str(out)] + (["--quick"] if args.quick else [])
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, check=False)
        if done.returncode != 0 or not out.exists():
            return {"framework": framework, "error": f"the child exited with status {done.returncode}"}
        result = json.loads(out.read_text())
        result["seconds"] = round(time.perf_counter() - started, 1)
        return result


def compile_triton_kernels() -> dict:
    """Compile the Triton kernels' launches for the GPT-2-like set in bfloat16 and a wide float32 row (every kernel
    in its writing mode with held-back rows, the first also in its checking and whole-step modes) for a Hopper GPU,
    without one: what Triton would compile there (the CPU suite runs the kernels in Triton's interpreter)."""
    try:
        import torch
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from nero_torch import _triton
    except ImportError as exc:
        return {"skipped": f"Triton is not importable: {exc}"}
    if type(_triton._finish).__name__ == "InterpretedFunction":
        return {"skipped": "TRITON_INTERPRET is set: the kernels are interpreted here"}
    from benchmarks.shapes import shape_set

    started, target = time.perf_counter(), GPUTarget("cuda", 90, 32)
    shapes = tuple((torch.bfloat16, t.torch_axis is not None, t.torch_shape[0] if t.torch_axis is not None else t.size,
                    t.fan_in) for t in shape_set("gpt2")) + ((torch.float32, True, 4, 4 * _triton.MAX_BLOCK),)
    pointers = {"table": "*i64", "blocks": "*i32", "flag": "*i32"}
    compiled = []
    for i, launch in enumerate(_triton._plan(shapes, torch.device("cpu"), _triton.MAX_BLOCK)):
        constants = {k: v for k, v in launch.options.items() if k != "num_warps"}
        signature = {**pointers, **{k: "constexpr" for k in constants}, "MODE": "constexpr"}
        for mode in (_triton.NEURON, _triton.CHECK, _triton.WHOLE) if i == 0 else (_triton.NEURON,):
            source = ASTSource(fn=launch.kernel, signature=signature, constexprs={**constants, "MODE": mode})
            triton.compile(source, target=target,
                           options={"num_warps": launch.options["num_warps"], "enable_fp_fusion": False})
            compiled.append(f"{launch.kernel.__name__}({constants['P_DTYPE']}, BLOCK={constants['BLOCK']}, "
                            f"MODE={mode.value})")
    finish = {"table": "*i64", "flag": "*i32", "skipped": "*i64", "count": "i32", "MODE": "constexpr",
              "BLOCK": "constexpr"}
    for mode in (_triton.WHOLE, _triton.NEURON):
        triton.compile(ASTSource(fn=_triton._finish, signature=finish, constexprs={"MODE": mode, "BLOCK": 128}),
                       target=target, options={"enable_fp_fusion": False})
        compiled.append(f"_finish(MODE={mode.value})")
    return {"target": "cuda sm_90", "triton": triton.__version__, "kernels": compiled,
            "seconds": round(time.perf_counter() - started, 1)}


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    from benchmarks.machine import describe

    return str(describe(bandwidth=False)["cpu"])


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    lines = [
        f"# Nero on {report['device_name']}: one step on the `{report['shapes']}` shape set "
        f"({report['parameters']:,} float32 parameters)",
        "",
        f"Measured {report['date']} by `python asv_bench/gpu_check.py{report['arguments']}` "
        f"({'quick: few rounds' if report['quick'] else f'{timing.ROUNDS} interleaved rounds'}). "
        f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}.",
        f"GPU tests: `{report['tests']['command']}`: {report['tests']['summary']}.",
        "",
        "Bandwidth: the traffic of an ideal step (3 x parameter bytes + 2 x state bytes) over its time, and as a "
        "fraction of a device-to-device copy timed in the same rounds.",
        "",
        "| framework | optimizer | ms/step | x Adam | x SGD | x Muon | GB/s | x copy | state MiB | extra MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for child in report["frameworks"]:
        if "error" in child:
            lines.append(f"| {child['framework']} | {child['error']} |||||||||")
            continue
        lines.append(f"| {child['backend']} | copy ({child['copy_gb_per_s']:.0f} GB/s) | | | | | | 1.00 | | |")
        for r in child["rows"]:
            extra = None if r["extra_bytes"] is None else r["extra_bytes"] / 2**20
            lines.append(
                f"| {r['backend']} | {r['optimizer']} | {r['ms']:.3f} | {_fmt(r['x_adam'], '.2f')} "
                f"| {_fmt(r['x_sgd'], '.2f')} | {_fmt(r['x_muon'], '.2f')} | {r['gb_per_s']:.0f} "
                f"| {r['x_copy_bandwidth']:.2f} | {r['state_bytes'] / 2**20:.2f} | {_fmt(extra, '.1f')} |"
            )
        for name, why in child["skipped"].items():
            lines.append(f"| {child['backend']} | {name}: skipped ({why}) |||||||||")
    if report.get("targets"):
        lines += ["", "Targets (an H100):", *[f"- {t}" for t in report["targets"]]]
    compiled = report.get("triton_compile")
    if compiled:
        lines += ["", "Triton kernels compiled for a GPU without one: " + (
            compiled["skipped"] if "skipped" in compiled else
            f"{len(compiled['kernels'])} for {compiled['target']} with Triton {compiled['triton']} "
            f"in {compiled['seconds']} s")]
    return "\n".join(lines) + "\n"


def targets(children: list[dict]) -> list[str]:
    rows = {(r["framework"], r["optimizer"]): r for c in children for r in c.get("rows", [])}
    out = []
    for framework, optimizer, reference, limit in TARGETS:
        r = rows.get((framework, optimizer))
        if r is None or r["x_adam"] is None:
            continue
        line = f"{framework} {optimizer}: {r['x_adam']:.2f}x {reference} (<= {limit}: " \
               f"{'ok' if r['x_adam'] <= limit else 'MISS'})"
        if framework == "torch":
            ok = r["x_copy_bandwidth"] >= COPY_TARGET
            line += f"; {r['x_copy_bandwidth']:.2f} of copy bandwidth (>= {COPY_TARGET}: {'ok' if ok else 'MISS'})"
        out.append(line)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="the mlp set and 3 short rounds (CI)")
    parser.add_argument("--shapes", help="a shape set of benchmarks/shapes.py (default gpt2; --quick: mlp)")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated: torch,jax,cupy")
    parser.add_argument("--no-tests", action="store_true", help="skip pytest -m gpu")
    parser.add_argument("--out", type=Path, help="writes OUT.json and OUT.md (default: asv_bench/measured/gpt2_gpu "
                                                 "on CUDA, a temporary folder on CPU)")
    parser.add_argument("--child", choices=tuple(FRAMEWORKS), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.shapes = args.shapes or ("mlp" if args.quick else "gpt2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = {"rounds": 3, "block_seconds": 0.02} if args.quick else {}
    if args.child:
        args.child_out.write_text(json.dumps(measure(args.child, args.device, args.shapes, options)))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: torch sees no CUDA device; use --device cpu", file=sys.stderr)
            return 2
    started = time.perf_counter()
    tests = {"command": "", "returncode": 0, "summary": "not run (--no-tests)"} if args.no_tests else run_tests(
        args.device)
    children = [run_child(name, args) for name in args.frameworks.split(",")]
    versions: dict = {}
    for child in children:
        versions.update(child.get("versions", {}))
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": args.device,
        "device_name": device_name(args.device), "shapes": args.shapes, "parameters": parameter_count(args.shapes),
        "quick": args.quick, "arguments": "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
        "versions": versions, "tests": tests, "frameworks": children,
        "targets": targets(children) if args.device == "cuda" else [],
        "triton_compile": compile_triton_kernels() if args.device == "cpu" else None,
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    out = args.out or (HERE / "measured" / "gpt2_gpu" if args.device == "cuda"
                       else Path(tempfile.gettempdir()) / "nero-gpu-check" / "gpt2_gpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} in {report['seconds']} s", file=sys.stderr)
    failed = tests["returncode"] not in (0, 5) or any("error" in c for c in children)  # 5: no test selected
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
