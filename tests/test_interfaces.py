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
    for k in range(4):
        grads = _tree(jnp, seed=k + 1)
        updates, state = step(grads, state, params)
        fixed = make(nero_optax, float(schedule(k)))
        expected, expected_state = jax.jit(fixed.update)(grads, expected_state, params)
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
