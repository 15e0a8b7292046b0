"""Nero's step time and state size against torch's own optimizers, measured in one process.

Run ``python -m nero_torch.benchmark`` (``--help`` for options). It builds the parameters of a GPT-2-like model
(d=512, 8 layers, vocabulary 8192, ~29M parameters, tied head) with fixed random gradients, times
``optimizer.step()`` for each optimizer in interleaved rounds (so that a noisy, shared machine slows all of them
alike), and prints each median step time as a ratio to ``torch.optim.Adam(fused=True)``, plus the state bytes
of Nero over Adam's. :func:`measure` returns the same figures for reuse (e.g. by the asv suite).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ._optimizer import Nero

__all__ = ["gpt2_like_shapes", "measure", "state_bytes"]


def gpt2_like_shapes(d: int = 512, layers: int = 8, vocab: int = 8192, context: int = 1024) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-like transformer with a head tied to the token embedding."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (context, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,)]  # LayerNorm, attention
        shapes += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]  # LayerNorm, MLP
    return shapes + [(d,), (d,)]  # final LayerNorm


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


OPTIMIZERS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "adam_fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
    "adam_foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
    "sgd_foreach": lambda ps: torch.optim.SGD(ps, lr=1e-3, foreach=True),
    "nero": lambda ps: Nero(ps),
    "nero_fused": lambda ps: Nero(ps, fused=True),
    "nero_fused_neuron": lambda ps: Nero(ps, fused=True, skip_nonfinite="neuron"),
}


def measure(
    names: list[str] | None = None, *, rounds: int = 7, steps: int = 5, shapes: list[tuple[int, ...]] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Median seconds per step per optimizer, ratios to fused Adam, state bytes and Nero's compile time."""
    names = names or list(OPTIMIZERS)
    shapes = shapes or gpt2_like_shapes()
    gen = torch.Generator().manual_seed(seed)
    setups, first_step = {}, {}
    for name in names:
        params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        opt = OPTIMIZERS[name](params)
        opt.step()  # state initialisation (Nero's first update is the exact projection)
        start = time.perf_counter()
        opt.step()  # the first steady-state step: includes torch.compile for fused Nero
        first_step[name] = time.perf_counter() - start
        setups[name] = opt
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            start = time.perf_counter()
            for _ in range(steps):
                setups[name].step()
            times[name].append((time.perf_counter() - start) / steps)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    reference = median.get("adam_fused")
    result: dict[str, Any] = {
        "params": sum(torch.Size(s).numel() for s in shapes),
        "seconds": median,
        "ratio_to_adam_fused": {n: t / reference for n, t in median.items()} if reference else {},
        "first_steady_step_seconds": first_step,
    }
    if "adam_fused" in setups:
        adam_bytes = state_bytes(setups["adam_fused"])
        result["state_bytes"] = {n: state_bytes(o) for n, o in setups.items()}
        result["state_ratio_to_adam"] = {n: b / adam_bytes for n, b in result["state_bytes"].items()}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nero_torch.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", nargs="*", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args.optimizers, rounds=args.rounds, steps=args.steps)
    print(f"GPT-2-like shape set, {r['params'] / 1e6:.1f}M parameters, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {args.rounds} rounds x {args.steps} steps")
    for name, seconds in r["seconds"].items():
        ratio = r["ratio_to_adam_fused"].get(name, float("nan"))
        state = r.get("state_ratio_to_adam", {}).get(name, float("nan"))
        print(f"  {name:14s} {seconds * 1e3:8.2f} ms/step   {ratio:5.2f}x Adam(fused)   state {state:8.2%} of Adam's"
              f"   first steady step {r['first_steady_step_seconds'][name]:.2f} s")


if __name__ == "__main__":
    main()
