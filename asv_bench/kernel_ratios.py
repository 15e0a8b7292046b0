"""The C kernel of ``Nero(fused=True)`` against SGD and fused Adam, step for step, in one process.

    python asv_bench/kernel_ratios.py --threads 1                 # a cache-resident 2048x512 float32 tensor
    python asv_bench/kernel_ratios.py --threads 2 --set gpt2      # the GPT-2-like shape set (~30M parameters)
    python asv_bench/kernel_ratios.py --shape 4096x64 --shape 512x4096

Each optimizer gets its own copy of the same float32 parameters and fixed gradients; after two warm-up steps
their steps are timed in interleaved blocks (so that load on a shared machine falls on all of them alike). Each
round gives every optimizer's time per step and its ratio to SGD (``torch.optim.SGD(foreach=True)``, no
momentum: the bandwidth floor) measured in that round; the table gives the median over rounds with the spread
(lowest and highest ratio), the ratio of the fastest rounds (the least disturbed by other load), and the
machine (CPU model, caches, threads). ``--clock thread`` times with the calling thread's CPU time instead of the
wall clock (``--clock cpu``: the process's): on a machine shared with other work it leaves out the time the
process waits for a core, so with one thread it is the time an idle machine would show (with several, ``cpu``
also counts threads that spin while waiting, and ``thread`` misses the others' work)."""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

import nero_torch
from nero_torch.benchmark import gpt2_like_shapes

OPTIMIZERS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-3, foreach=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
    "nero-fused": lambda ps: nero_torch.Nero(ps, fused=True),
    "nero-fused-neuron": lambda ps: nero_torch.Nero(ps, fused=True, skip_nonfinite="neuron"),
}


def machine() -> str:
    """CPU model, caches and torch's thread count, as ``lscpu`` reports them."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        wanted = ("Model name", "L1d cache", "L2 cache", "L3 cache")
        described = ", ".join(f"{k} {fields[k].strip()}" for k in wanted if k in fields)
    except (OSError, subprocess.CalledProcessError):
        described = platform.processor()
    return f"{described}; {torch.get_num_threads()} torch threads; torch {torch.__version__}"


def make_steps(shapes: list[tuple[int, ...]], names: list[str], seed: int = 0) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(seed)
    values = [(torch.randn(s, generator=gen) / math.sqrt(s[-1]), torch.randn(s, generator=gen) * 1e-3) for s in shapes]
    steps = {}
    for name in names:
        params = [torch.nn.Parameter(w.clone()) for w, _ in values]
        for p, (_, g) in zip(params, values):
            p.grad = g.clone()
        opt = OPTIMIZERS[name](params)
        opt.step()
        opt.step()
        steps[name] = opt.step
    return steps


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time, "thread": time.thread_time}


def measure(steps: dict[str, Callable[[], object]], rounds: int, block_seconds: float,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per step of each optimizer, one sample per round, the optimizers interleaved within a round."""
    per_block = {}
    for name, step in steps.items():
        start = time.perf_counter()
        step()
        per_block[name] = max(1, round(block_seconds / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            n = per_block[name]
            start = clock()
            for _ in range(n):
                step()
            samples[name].append((clock() - start) / n)
    return samples


def report(title: str, samples: dict[str, list[float]]) -> None:
    print(title)
    sgd, adam = samples.get("sgd"), samples.get("adam-fused")
    for name, times in samples.items():
        line = f"  {name:18s} {statistics.median(times) * 1e3:8.3f} ms/step"
        for ref_name, ref in (("SGD", sgd), ("Adam(fused)", adam)):
            if ref is not None and ref is not times:
                ratios = [t / r for t, r in zip(times, ref)]
                line += (f"   {statistics.median(ratios):5.2f}x {ref_name} [{min(ratios):.2f}-{max(ratios):.2f}, "
                         f"fastest {min(times) / min(ref):.2f}]")
        print(line, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", action="append", help="ROWSxCOLS of one float32 tensor (default 2048x512)")
    parser.add_argument("--set", choices=["gpt2"], help="a shape set instead of single tensors")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated, from the default")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--block-seconds", type=float, default=0.05)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.optimizers.split(",")
    print(f"{machine()}; {args.clock} clock")
    if args.set == "gpt2":
        shape_sets = {"GPT-2-like set": gpt2_like_shapes()}
    else:
        shape_sets = {s: [tuple(int(n) for n in s.split("x"))] for s in args.shape or ["2048x512"]}
    for title, shapes in shape_sets.items():
        steps = make_steps(shapes, names)
        report(f"{title}, float32, median of {args.rounds} interleaved rounds [lowest-highest ratio]",
               measure(steps, args.rounds, args.block_seconds, CLOCKS[args.clock]))


if __name__ == "__main__":
    main()
