"""The interfaces each ecosystem expects: optax schedules as hyperparameters, torch's lr schedulers with AGD,
``add_param_group`` with the groups ``param_groups()`` makes, a clear message for a dict given to the core, no
warnings from a compiled step, and a cheap ``import nero_torch``."""

from __future__ import annotations

import numpy as np
import pytest

import nero_core


# ---- optax: schedules ---------------------------------------------------------------------------------------


def _optax():
    pytest.importorskip("optax")
    import jax
    import jax.numpy as jnp
    import optax

    import nero_optax

    return jax, jnp, optax, nero_optax


def _tree(jnp, seed=0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(5, 3))), "b": jnp.asarray(rng.normal(size=3))}


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda no, v: no.nero(learning_rate=v), "nero learning_rate"),
        (lambda no, v: no.agd(gain=v), "agd gain"),
        (lambda no, v: no.star(step_mult=v, nominal_stepsize=v), "star step sizes"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_a_schedule_gives_the_steps_of_its_values(make, name):
    """A schedule (a function of the count) gives, step by step, what the optimizer given each value gives."""
    jax, jnp, optax, nero_optax = _optax()
    def schedule(count):  # as optax's schedules are: a function of the count; exact values, for an exact check
        return jnp.where(count < 2, 0.02, 0.005)

    params = _tree(jnp)
    scheduled = make(nero_optax, schedule)
    state, expected_state = scheduled.init(params), scheduled.init(params)
    step = jax.jit(scheduled.update)
    fixed_step = jax.jit(lambda value, *args: make(nero_optax, value).update(*args))  # the value as a 0-d array
    for k in range(4):
        grads = _tree(jnp, seed=k + 1)
        updates, state = step(grads, state, params)
        expected, expected_state = fixed_step(schedule(k), grads, expected_state, params)
        for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-15)
        params = optax.apply_updates(params, updates)
    assert int(state.count) == 4


def test_a_schedule_is_not_checked_as_a_number_but_a_bad_number_still_is():
    _, _, optax, nero_optax = _optax()
    nero_optax.nero(learning_rate=optax.constant_schedule(0.01))
    with pytest.raises(ValueError, match="learning_rate must be a finite number"):
        nero_optax.nero(learning_rate=-1.0)
    with pytest.raises(ValueError, match="gain must be a finite number"):
        nero_optax.agd(gain=float("nan"))


# ---- torch: a compiled step, and the import ---------------------------------------------------------------------


def test_a_compiled_step_raises_no_warnings():
    """Dynamo traces the step (the eager backend: tracing is where the warnings came from, 11 of them from
    array_api_compat's cached helpers), first update and steady state."""
    torch = pytest.importorskip("torch")
    import warnings

    import nero_torch

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = nero_torch.Nero(nero_torch.param_groups(model, unconstrained=["2"]))

    @torch.compile(backend="eager")
    def step():
        opt.step()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(5, 4)).square().mean().backward()
            step()
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert int(opt.state[model[0].weight]["step"]) == 3


def test_import_nero_torch_does_not_import_dynamo():
    """``torch._dynamo`` costs seconds to import (it was 3.2 s of the 7 s ``import nero_torch`` took against 3.5 s
    for ``import torch``); building an optimizer imports it, as any ``torch.optim.Optimizer`` does."""
    pytest.importorskip("torch")
    import subprocess
    import sys

    code = "import sys, nero_torch; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
