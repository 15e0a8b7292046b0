"""Step time of jitted Nero against jitted optax optimizers on a GPT-2-like shape set, in one process.

    python -m nero_optax.benchmark [--repeats 9] [--steps 10] [--dtype float32]

Each optimizer's step is ``update`` then ``optax.apply_updates``, jitted with the params and state donated, as a
training loop would run it; gradients are fixed random arrays. The figure printed is the median over repeats of the
time per step, and its ratio to ``optax.adam``. Optimizers take turns within each repeat so drift hits all alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nero_optax import flax_neuron_axis, nero

__all__ = ["gpt2_like_params", "main", "time_steps"]


def gpt2_like_params(
    dtype: Any = jnp.float32, layers: int = 8, vocab: int = 8192, context: int = 1024, width: int = 512
) -> dict:
    """A GPT-2-like parameter tree in Flax layout: kernels ``(in, out)``, embedding tables ``(rows, width)``."""
    rng = np.random.default_rng(0)

    def array(*shape: int, std: float = 0.02) -> Any:
        return jnp.asarray(rng.normal(scale=std, size=shape), dtype)

    def dense(fan_in: int, fan_out: int) -> dict:
        return {"kernel": array(fan_in, fan_out), "bias": jnp.zeros((fan_out,), dtype)}

    def norm() -> dict:
        return {"scale": jnp.ones((width,), dtype), "bias": jnp.zeros((width,), dtype)}

    block = lambda: {  # noqa: E731
        "ln_1": norm(),
        "attn": {"qkv": dense(width, 3 * width), "proj": dense(width, width)},
        "ln_2": norm(),
        "mlp": {"fc": dense(width, 4 * width), "fc2": dense(4 * width, width)},
    }
    return {
        "wte": {"embedding": array(vocab, width)},
        "wpe": {"embedding": array(context, width)},
        **{f"h_{i}": block() for i in range(layers)},
        "ln_f": norm(),
    }


def _jitted_step(opt: optax.GradientTransformation) -> Any:
    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def time_steps(optimizers: dict[str, optax.GradientTransformation], params: Any, *, repeats: int, steps: int) -> dict:
    """Median seconds per jitted, donated step of each optimizer; they take turns within each repeat."""
    grads = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(1).normal(size=p.shape), p.dtype), params)
    runs = {}
    for name, opt in optimizers.items():
        own = jax.tree.map(jnp.copy, params)
        step = _jitted_step(opt)
        own, state = step(own, opt.init(own), grads)  # compile, and take the first (projecting) step
        runs[name] = [step, jax.block_until_ready((own, state))]
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(repeats):
        for name, run in runs.items():
            step, (own, state) = run
            start = time.perf_counter()
            for _ in range(steps):
                own, state = step(own, state, grads)
            jax.block_until_ready((own, state))
            times[name].append((time.perf_counter() - start) / steps)
            run[1] = (own, state)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    args = parser.parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    params = gpt2_like_params(jnp.dtype(args.dtype))
    optimizers = {
        "adam": optax.adam(1e-3),
        "nero": nero(0.01, neuron_axis=flax_neuron_axis),
        "nero (core rule)": nero(0.01, neuron_axis=flax_neuron_axis, fused=False),
        "sgd": optax.sgd(1e-3),
        "lamb": optax.lamb(1e-3),
    }
    size = sum(p.size for p in jax.tree.leaves(params))
    print(f"GPT-2-like shape set: {size / 1e6:.1f}M {args.dtype} params; {jax.devices()[0].platform}, "
          f"median of {args.repeats} repeats x {args.steps} steps, jitted, params and state donated")
    seconds = time_steps(optimizers, params, repeats=args.repeats, steps=args.steps)
    for name, s in seconds.items():
        print(f"  {name:18s} {s * 1e3:8.2f} ms/step   {s / seconds['adam']:.3f}x adam")
    print(f"nero / adam step-time ratio: {seconds['nero'] / seconds['adam']:.3f}")
    return seconds


if __name__ == "__main__":
    main()
