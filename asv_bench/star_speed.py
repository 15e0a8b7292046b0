"""STAR's step time against Adam, measured in one process, one thread, interleaved rounds.

    python asv_bench/star_speed.py                         # both shape sets, torch and JAX
    python asv_bench/star_speed.py --shapes mlp1.8m --backends torch --rounds 5

Shape sets: ``mlp1.8m``, the 1.86M-parameter MLP of issue 23 (784 -> 1024 -> 1024 -> 10), and ``gpt2``, the
GPT-2-like set of ``benchmarks/shapes.py`` (29.9M parameters). References: ``torch.optim.Adam(foreach=True)`` and
``jax.jit(optax.adam)`` with parameters and state donated, against ``nero_torch.Star`` and jitted
``nero_optax.star``. Each round times one step of every optimizer in turn; the table gives per optimizer the
median wall time and the smallest CPU time (``time.process_time``: the least disturbed by other processes on a
busy machine) and STAR's ratios to Adam by each, and the first step's wall time (for a jitted step, its tracing and
compiling). Gradients are fixed random arrays (scale 1e-3), so the step time does not depend on a model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchmarks.shapes import shape_set  # noqa: E402

MLP_TORCH = [(1024, 784), (1024,), (1024, 1024), (1024,), (10, 1024), (10,)]


def shapes(name: str) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """(torch layout, flax layout) of a shape set."""
    if name == "mlp1.8m":
        return MLP_TORCH, [tuple(reversed(s)) for s in MLP_TORCH]
    tensors = shape_set(name)
    return [t.torch_shape for t in tensors], [t.flax_shape for t in tensors]


def torch_steps(torch_shapes):
    import torch

    import nero_torch

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)

    def tensors():
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.05) for s in torch_shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        return ps

    return {"adam": torch.optim.Adam(tensors(), lr=1e-3, foreach=True).step, "star": nero_torch.Star(tensors()).step}


def jax_steps(flax_shapes):
    import jax
    import optax

    import nero_optax

    key = jax.random.PRNGKey(0)
    params = [jax.random.normal(jax.random.fold_in(key, i), s) * 0.05 for i, s in enumerate(flax_shapes)]
    grads = [jax.random.normal(jax.random.fold_in(key, 1000 + i), s) * 1e-3 for i, s in enumerate(flax_shapes)]

    def make(tx):
        def update(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        step = jax.jit(update, donate_argnums=(0, 1))
        box = {"p": [a + 0 for a in params]}
        box["s"] = tx.init(box["p"])

        def run():
            box["p"], box["s"] = step(box["p"], box["s"], grads)
            jax.block_until_ready(box["p"])

        return run

    return {"adam": make(optax.adam(1e-3)), "star": make(nero_optax.star())}


def measure(steps: dict, rounds: int) -> dict[str, dict[str, float]]:
    first: dict[str, float] = {}
    for name, step in steps.items():  # warm-up (traces and compiles a jitted step, allocates state)
        start = time.perf_counter()
        step()
        first[name] = time.perf_counter() - start
        step()
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            w, c = time.perf_counter(), time.process_time()
            step()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    return {k: {"wall_median_s": statistics.median(wall[k]), "cpu_min_s": min(cpu[k]),
                "cpu_median_s": statistics.median(cpu[k]), "first_step_wall_s": first[k]} for k in steps}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="mlp1.8m,gpt2")
    ap.add_argument("--backends", default="torch,jax")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    results = []
    for shape_name in args.shapes.split(","):
        torch_shapes, flax_shapes = shapes(shape_name)
        for backend in args.backends.split(","):
            steps = torch_steps(torch_shapes) if backend == "torch" else jax_steps(flax_shapes)
            times = measure(steps, args.rounds)
            row = {"shapes": shape_name, "backend": backend, "times": times,
                   "ratio_wall_median": times["star"]["wall_median_s"] / times["adam"]["wall_median_s"],
                   "ratio_cpu_min": times["star"]["cpu_min_s"] / times["adam"]["cpu_min_s"]}
            results.append(row)
            adam, star = times["adam"], times["star"]
            print(f"{shape_name:8s} {backend:5s} adam {adam['cpu_min_s'] * 1e3:8.1f} ms  star "
                  f"{star['cpu_min_s'] * 1e3:8.1f} ms (CPU, min)  ratio {row['ratio_cpu_min']:5.1f}x; wall medians "
                  f"{adam['wall_median_s'] * 1e3:.1f} / {star['wall_median_s'] * 1e3:.1f} ms, "
                  f"ratio {row['ratio_wall_median']:.1f}x; first step {adam['first_step_wall_s']:.1f} / "
                  f"{star['first_step_wall_s']:.1f} s", flush=True)
            del steps
    if args.out:
        args.out.write_text(json.dumps({"command": "python asv_bench/star_speed.py " + " ".join(
            argv if argv is not None else sys.argv[1:]), "load_average": os.getloadavg(), "results": results},
            indent=1) + "\n")


if __name__ == "__main__":
    main()
