"""Nero's CPU kernels, exercised: three steps of ``nero_torch.Nero(fused=True)`` (float64) and of jitted
``nero_optax.nero()`` (float32) against the core rule (``nero_core.nero`` on NumPy, float64), recording whether each
adapter's kernel ran and every warning given.

Run as a script, ``python kernel_steps.py torch jax`` prints one JSON object per framework:
``{"framework", "kernel_ran", "deviation", "warnings"}`` (torch's also ``"prebuilt"``: whether the kernel that ran
was the wheel's prebuilt one). The installed-package tests import it or run it.
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

import numpy as np

import nero_core

STEPS = 3
# Per framework: the deviation from the core rule allowed after STEPS steps (the compute dtype's rounding).
TOLERANCE = {"torch": 1e-12, "jax": 1e-5}


def problem(neurons_last: bool) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Two weight matrices and a bias (float64), and each step's gradients."""
    rng = np.random.default_rng(0)
    shapes = [(16, 8), (16,), (4, 16)]
    if neurons_last:
        shapes = [s[::-1] for s in shapes]
    params = [rng.normal(size=s) for s in shapes]
    return params, [[rng.normal(size=s) for s in shapes] for _ in range(STEPS)]


def core_rule(params: list[np.ndarray], grads: list[list[np.ndarray]], neuron_axis: int) -> list[np.ndarray]:
    opt = nero_core.nero(neuron_axis=neuron_axis)
    state = opt.init(params)
    for step in grads:
        params, state = opt.update(step, state, params)
    return params


def _deviation(got: list[Any], expected: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - b))) for a, b in zip(got, expected))


def torch_run() -> dict[str, Any]:
    """``Nero(fused=True)``: the kernel ran if ``nero_torch._native.apply`` (the C kernel's update) was called."""
    import torch

    import nero_torch
    from nero_torch import _native

    params, grads = problem(neurons_last=False)
    calls = []
    apply = _native.apply

    def counted(*args: Any) -> None:
        calls.append(1)
        apply(*args)

    _native.apply = counted
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tensors = [torch.nn.Parameter(torch.tensor(p)) for p in params]
            opt = nero_torch.Nero(tensors, fused=True)
            for step in grads:
                for t, g in zip(tensors, step):
                    t.grad = torch.tensor(g)
                opt.step()
    finally:
        _native.apply = apply
    got = [t.detach().numpy() for t in tensors]
    result = _result("torch", bool(calls), _deviation(got, core_rule(params, grads, 0)), caught)
    result["prebuilt"] = bool(calls) and _native.library() is _native.prebuilt()  # the wheel's build ran
    return result


def jax_run() -> dict[str, Any]:
    """Jitted ``nero_optax.nero()`` on Flax-layout leaves: the kernel ran if its custom call is in the compiled
    update."""
    import jax
    import jax.numpy as jnp
    import optax

    import nero_optax
    from nero_optax import _native

    params, grads = problem(neurons_last=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = nero_optax.nero()
        tree = [jnp.asarray(p, jnp.float32) for p in params]
        state = opt.init(tree)
        update = jax.jit(opt.update)
        step_grads = [jnp.asarray(g, jnp.float32) for g in grads[0]]
        ran = _native.TARGET in update.lower(step_grads, state, tree).as_text()
        for step in grads:
            updates, state = update([jnp.asarray(g, jnp.float32) for g in step], state, tree)
            tree = optax.apply_updates(tree, updates)
    return _result("jax", ran, _deviation(tree, core_rule(params, grads, -1)), caught)


def _result(framework: str, ran: bool, deviation: float, caught: list[warnings.WarningMessage]) -> dict[str, Any]:
    return {"framework": framework, "kernel_ran": ran, "deviation": deviation,
            "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}


RUNS = {"torch": torch_run, "jax": jax_run}

if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(json.dumps(RUNS[name]()), flush=True)
