"""optax's own optimizer battery, ``optax/_src/alias_test.py`` (shipped in the optax wheel), run against
``nero_optax.nero``, ``agd`` and ``star``.

The battery's test methods are called as they are (their undecorated functions, with optax's own ``TestCase`` as
``self``) with optax's optimizer lookup pointed at ours. Applicable, and run here:

* ``test_optimizers_accept_extra_args``: ``update(grads, state, params, some_extra_arg=...)`` works
  (``GradientTransformationExtraArgs``: extra keyword arguments are accepted and ignored);
* ``test_optimizers_can_be_wrapped_in_inject_hyperparams``: same updates and state under ``inject_hyperparams``
  (for Nero with ``neuron_axis`` held static, as the battery holds Adafactor's ``min_dim_size_to_factor``: an axis
  cannot be a traced array);
* ``test_preserve_dtype``: updates in the gradients' dtype (bfloat16, float32);
* ``test_state_shape_dtype_shard_stability``: the state keeps its shapes, dtypes and shardings through a step
  (so a second jitted call does not recompile), float16 to float64;
* ``test_gradient_accumulation``: inside ``optax.MultiSteps``.

Left out, and why:

* ``test_optimization`` asserts that each optimizer reaches the minimum of a parabola and of Rosenbrock's function
  in one 1-D parameter to 3e-2 within 10,000 steps. Nero treats a 1-D parameter as bias-like: each element moves
  by about ``lr * sigma`` per step with ``sigma`` fixed at the first step (its mean magnitude, or 0.01 from zero,
  which Rosenbrock's start is), a fixed relative step with no decay, so it circles the minimum at that radius (or
  crawls towards it) rather than converging to a tolerance; AGD's step in a network without a weight matrix has no
  scale to take; STAR is meta-trained for networks, not for this target. The property that test also checks,
  no recompilation on the second call, is covered by the state stability test.
* AGD in the tests whose parameter is one 1-D array (all but the ``inject_hyperparams`` one): AGD is defined on
  a network's weight matrices and refuses a model without one (``ValueError``). Its extra arguments and its state's
  stability are tested here on a weight matrix instead.
* Complex dtypes: the three rules refuse complex parameters with a ``TypeError`` by design.
* ``test_explicit_dtype`` tests only SGD's and Adam's ``accumulator_dtype``/``mu_dtype`` options.
"""

from __future__ import annotations

import types

import pytest

optax = pytest.importorskip("optax")
alias_test = pytest.importorskip("optax._src.alias_test")  # needs absl, scipy and scikit-learn
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import nero_optax  # noqa: E402

from optax._src import test_utils  # noqa: E402


def nero_static_axis(learning_rate=0.01, beta=0.999):
    """Nero with its neuron axis out of the signature, where ``inject_hyperparams`` cannot turn it into an array."""
    return nero_optax.nero(learning_rate, beta)


OPTIMIZERS = {  # name: (factory, keyword arguments), as the battery's _OPTIMIZERS_UNDER_TEST lists them
    "nero": (nero_optax.nero, {"learning_rate": 0.01}),
    "nero_static_axis": (nero_static_axis, {"learning_rate": 0.01}),
    "agd": (nero_optax.agd, {"gain": 1.0}),
    "star": (nero_optax.star, {"step_mult": 1e-3}),
}
ONE_TENSOR = ["nero", "star"]  # the tests whose parameter is one 1-D array


@pytest.fixture(autouse=True)
def our_optimizers(monkeypatch):
    """The battery looks optimizers up by name in optax's ``alias`` module: point it at ours."""
    monkeypatch.setattr(alias_test, "alias", types.SimpleNamespace(**{k: f for k, (f, _) in OPTIMIZERS.items()}))


def battery_test(name: str):
    """The undecorated test function and an optax ``TestCase`` to run it with as ``self``."""
    method = f"{name}0"  # absl's parameterized expands every test into name0, name1, ...
    return getattr(alias_test.AliasTest, method).__wrapped__, alias_test.AliasTest(method)


@pytest.mark.parametrize("opt_name", ONE_TENSOR)
def test_accepts_extra_args(opt_name):
    test, case = battery_test("test_optimizers_accept_extra_args")
    test(case, opt_name=opt_name, opt_kwargs=OPTIMIZERS[opt_name][1])


@pytest.mark.parametrize("opt_name", ["nero_static_axis", "agd", "star"])
def test_can_be_wrapped_in_inject_hyperparams(opt_name):
    test, case = battery_test("test_optimizers_can_be_wrapped_in_inject_hyperparams")
    test(case, opt_name=opt_name, opt_kwargs=OPTIMIZERS[opt_name][1])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("opt_name", ONE_TENSOR)
def test_preserve_dtype(opt_name, dtype):
    test, case = battery_test("test_preserve_dtype")
    test(case, opt_name=opt_name, opt_kwargs=OPTIMIZERS[opt_name][1], dtype=dtype)


@pytest.mark.parametrize(
    "opt_name, dtype",
    [("nero", d) for d in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)]
    + [("star", jnp.bfloat16), ("star", jnp.float64)],  # STAR's state follows the same compute-dtype rule
    ids=lambda x: getattr(x, "__name__", x),
)
def test_state_shape_dtype_shard_stability(opt_name, dtype):
    test, case = battery_test("test_state_shape_dtype_shard_stability")
    test(case, opt_name=opt_name, opt_kwargs=OPTIMIZERS[opt_name][1], dtype=dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("opt_name", ONE_TENSOR)
def test_gradient_accumulation(opt_name, dtype):
    test, case = battery_test("test_gradient_accumulation")
    test(case, opt_name=opt_name, opt_kwargs=OPTIMIZERS[opt_name][1], dtype=dtype)


def test_agd_accepts_extra_args_and_its_jitted_step_does_not_recompile():
    """The battery's extra-arguments and no-recompile checks for AGD, on a weight matrix (it needs one)."""
    opt = nero_optax.agd()
    params = {"w": jnp.ones((3, 4), jnp.float32) + jnp.arange(4.0, dtype=jnp.float32), "b": jnp.zeros(4, jnp.float32)}
    params = jax.device_put(params, jax.devices()[0])  # committed, as the step's outputs are

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: jnp.sum(jnp.tanh(jnp.ones(3) @ p["w"] + p["b"]) ** 2))(params)
        updates, state = opt.update(grads, state, params, unexpected_extra_args_your_optimizer_doesnt_expect=1)
        return optax.apply_updates(params, updates), state

    params, state = step(params, opt.init(params))
    with test_utils.log_compilations() as compilations:
        params, state = step(params, state)
    assert not compilations, "AGD recompiles on the second call"
    assert int(state.count) == 2 and float(state.eta) > 0
