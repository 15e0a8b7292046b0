"""What a user without a C/C++ compiler gets: step-time ratios on the GPT-2-like set (``asv_bench``'s ``gpt2``
shapes and cases), with the compilers hidden and with them, in alternating child processes.

    python tests/installed/no_compiler_ratios.py --pairs 3

Each child times, in interleaved rounds, ``Nero(fused=True)``, fused Adam and SGD on torch-cpu, and
``nero_optax.nero()``, jitted Adam and SGD on jax-cpu, and prints each Nero's per-round median ratio to Adam and to
SGD. "Hidden" is what a container without build tools has: ``PATH`` without compilers, ``CC``/``CXX`` naming
none, an empty kernel cache. Each child checks which kernels it ran (the C kernel built there and the XLA custom
call with a compiler; without, the wheel's prebuilt C kernel where it has one, else the eager torch kernels, and
XLA's reductions).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CASES = {"torch-cpu": ("nero-fused", "adam-fused", "sgd"), "jax-cpu": ("nero", "adam", "sgd")}


def child(rounds: int, block_seconds: float) -> dict[str, dict[str, float]]:
    """Per backend: Nero's median (over rounds) ratio to Adam and to SGD, and which Nero kernels ran."""
    sys.path.insert(0, str(ROOT / "asv_bench"))
    from benchmarks.cases import make_case

    from nero_optax import _native as optax_native
    from nero_torch import _native as torch_native

    out = {}
    for backend, names in CASES.items():
        cases = {name: make_case(backend, name, "gpt2") for name in names}
        repeats = {}
        for name, case in cases.items():
            start = time.perf_counter()
            case.step()
            repeats[name] = max(1, round(block_seconds / (time.perf_counter() - start)))
        per_round: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(rounds):
            for name, case in cases.items():
                start = time.perf_counter()
                for _ in range(repeats[name]):
                    case.step()
                per_round[name].append((time.perf_counter() - start) / repeats[name])
        nero, adam, sgd = names
        out[backend] = {
            "x_adam": statistics.median(n / a for n, a in zip(per_round[nero], per_round[adam])),
            "x_sgd": statistics.median(n / s for n, s in zip(per_round[nero], per_round[sgd])),
            "nero_ms": 1e3 * statistics.median(per_round[nero]),
        }
    lib = torch_native.library()
    out["kernels"] = {"torch C kernel built here": lib is not None and lib is not torch_native.prebuilt(),
                      "torch prebuilt C kernel": lib is not None and lib is torch_native.prebuilt(),
                      "XLA custom call": bool(optax_native._registered())}
    return out


def hidden_compilers(env: dict[str, str], tmp: Path) -> dict[str, str]:
    """``env`` as in a container without build tools."""
    bare = tmp / "bin"
    bare.mkdir(parents=True, exist_ok=True)
    return dict(env, PATH=str(bare), CC=str(bare / "cc"), CXX=str(bare / "c++"), NERO_KERNEL_CACHE=str(tmp / "cache"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="(with, without compilers) process pairs")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--block-seconds", type=float, default=0.3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the no-compiler notices; the kernels are checked
            print(json.dumps(child(args.rounds, args.block_seconds)))
        return
    from nero_torch import _native as torch_native

    prebuilt = torch_native.prebuilt() is not None  # (the wheel's, where it has one for this CPU)
    runs: dict[str, list[dict]] = {"with": [], "without": []}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            for mode in ("with", "without"):
                env = dict(os.environ) if mode == "with" else hidden_compilers(dict(os.environ), Path(tmp) / str(pair))
                cmd = [sys.executable, __file__, "--child", "--rounds", str(args.rounds),
                       "--block-seconds", str(args.block_seconds)]
                done = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, check=True)
                result = json.loads(done.stdout.splitlines()[-1])
                expected = {"torch C kernel built here": mode == "with", "XLA custom call": mode == "with",
                            "torch prebuilt C kernel": mode == "without" and prebuilt}
                assert result["kernels"] == expected, result["kernels"]
                runs[mode].append(result)
                print(f"pair {pair + 1} {mode:7} compilers: " + "  ".join(
                    f"{b} Nero {r['x_adam']:.2f}x Adam {r['x_sgd']:.2f}x SGD ({r['nero_ms']:.1f} ms)"
                    for b, r in result.items() if b != "kernels"), flush=True)
    for mode, results in runs.items():
        for backend in CASES:
            for key in ("x_adam", "x_sgd"):
                values = sorted(r[backend][key] for r in results)
                print(f"{mode:7} compilers, {backend}, Nero {key[2:]}: median {statistics.median(values):.2f}x, "
                      f"range {values[0]:.2f} to {values[-1]:.2f} over {len(values)} runs")


if __name__ == "__main__":
    main()
