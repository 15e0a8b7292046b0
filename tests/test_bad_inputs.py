"""Bad input, one table over the three entry points: the core rule (``nero_core.nero``), ``nero_torch.Nero`` and
``nero_optax.nero``. Every case gets its exception type and a message that names the argument or parameter.

Each case is a small function that raises; it runs under ``pytest.raises(type, match=message)``. Where torch itself
refuses an input before Nero sees it (a gradient of another shape, dtype or sparse layout cannot be assigned to
``.grad``), the case records torch's own error, so that the table says what a user gets.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import nero_core

CASES: list = []


def case(entry: str, label: str, error: type[Exception], message: str):
    """Register ``fn`` as the table row ``entry-label``: calling it must raise ``error`` matching ``message``."""

    def register(fn):
        CASES.append(pytest.param(fn, error, message, id=f"{entry}-{label}"))
        return fn

    return register


@pytest.mark.parametrize(("make", "error", "message"), CASES)
def test_bad_input_gets_a_clear_error(make, error, message):
    with pytest.raises(error, match=message):
        make()


# ---- entry points, each building its optimizer and taking one step ---------------------------------------------


def core_step(params=None, grads=None, state=None, **options):
    opt = nero_core.nero(**options)
    params = [np.ones((3, 4))] if params is None else params
    grads = [np.ones_like(p) for p in params] if grads is None else grads
    return opt.update(grads, opt.init(params) if state is None else state, params)


def torch_step(param=None, grad=None, **options):
    torch = pytest.importorskip("torch")
    import nero_torch

    p = torch.nn.Parameter(torch.ones(3, 4)) if param is None else param
    opt = nero_torch.Nero([p], **options)
    p.grad = torch.ones_like(p) if grad is None else grad
    opt.step()


def optax_step(params=None, grads=None, state=None, **options):
    jnp = pytest.importorskip("jax.numpy")
    import nero_optax

    opt = nero_optax.nero(**options)
    params = {"w": jnp.ones((3, 4))} if params is None else params
    grads = {k: jnp.ones_like(v) for k, v in params.items()} if grads is None else grads
    return opt.update(grads, opt.init(params) if state is None else state, params)


def _torch():
    return pytest.importorskip("torch")


def _jnp():
    return pytest.importorskip("jax.numpy")


# ---- hyperparameters --------------------------------------------------------------------------------------------

for value in (-0.1, math.nan, math.inf, -math.inf):
    shown = re.escape(repr(value))
    case("core", f"lr={value}", ValueError, rf"lr must be a finite number in \[0.0, inf\], got {shown}")(
        lambda value=value: core_step(lr=value))
    case("torch", f"lr={value}", ValueError, rf"Invalid learning rate: {shown} \(a finite number >= 0\)")(
        lambda value=value: torch_step(lr=value))
    case("optax", f"lr={value}", ValueError, rf"learning_rate must be a finite number in \[0.0, inf\], got {shown}")(
        lambda value=value: optax_step(learning_rate=value))

for value in ("0.01", None):
    shown = re.escape(repr(value))
    case("core", f"lr={value!r}", TypeError, rf"lr must be a number or a 0-d array, got {shown}")(
        lambda value=value: core_step(lr=value))
    case("torch", f"lr={value!r}", ValueError, rf"Invalid learning rate: {shown}")(
        lambda value=value: torch_step(lr=value))
    case("optax", f"lr={value!r}", TypeError, rf"learning_rate must be a number or a 0-d array, got {shown}")(
        lambda value=value: optax_step(learning_rate=value))

case("torch", "lr=tensor(nan)", ValueError, r"Invalid learning rate: tensor\(nan\) \(a finite number >= 0\)")(
    lambda: torch_step(lr=_torch().tensor(math.nan)))
case("torch", "lr=tensor(-0.5)", ValueError, r"Invalid learning rate: tensor\(-0.5000\)")(
    lambda: torch_step(lr=_torch().tensor(-0.5)))
case("torch", "lr=tensor-of-2", ValueError, r"Tensor lr must be 1-element")(
    lambda: torch_step(lr=_torch().tensor([0.1, 0.2])))

for value in (-0.1, 1.0, 1.5, math.nan, math.inf, np.float32(1.0), True):
    shown = re.escape(repr(value))
    case("core", f"beta={value!r}", ValueError, rf"beta must be a finite number in \[0.0, 1.0\), got {shown}")(
        lambda value=value: core_step(beta=value))
    case("torch", f"beta={value!r}", ValueError, rf"Invalid beta: {shown} \(a number in \[0, 1\)\)")(
        lambda value=value: torch_step(beta=value))
    case("optax", f"beta={value!r}", ValueError, rf"beta must be a finite number in \[0.0, 1.0\), got {shown}")(
        lambda value=value: optax_step(beta=value))

case("core", "beta=None", TypeError, r"beta must be a number or a 0-d array, got None")(lambda: core_step(beta=None))
case("torch", "beta=None", ValueError, r"Invalid beta: None")(lambda: torch_step(beta=None))
case("optax", "beta=None", TypeError, r"beta must be a number or a 0-d array, got None")(lambda: optax_step(beta=None))
case("torch", "beta=tensor", ValueError, r"Invalid beta: tensor\(0.9000\) \(a number in \[0, 1\)\)")(
    lambda: torch_step(beta=_torch().tensor(0.9)))

# ---- neuron axis ------------------------------------------------------------------------------------------------

case("core", "neuron_axis=2", ValueError,
     r"neuron_axis 2 is out of range for params\[0\] of shape \(3, 4\) \(ndim 2\)")(
    lambda: core_step(neuron_axis=2))
case("torch", "neuron_axis=2", ValueError,
     r"neuron_axis 2 is out of range for parameter 0 \(shape \(3, 4\), dtype torch.float32\) with 2 dimensions")(
    lambda: torch_step(neuron_axis=2))
case("optax", "neuron_axis=2", ValueError, r"neuron_axis 2 is out of range for leaf \['w'\] of shape \(3, 4\)")(
    lambda: optax_step(neuron_axis=2))
case("core", "neuron_axis=-3", ValueError, r"neuron_axis -3 is out of range for params\[0\] of shape \(3, 4\)")(
    lambda: core_step(neuron_axis=-3))
case("torch", "neuron_axis=-3", ValueError, r"neuron_axis -3 is out of range for parameter 0 \(shape \(3, 4\)")(
    lambda: torch_step(neuron_axis=-3))
case("optax", "neuron_axis=-3", ValueError, r"neuron_axis -3 is out of range for leaf \['w'\] of shape \(3, 4\)")(
    lambda: optax_step(neuron_axis=-3))
case("core", "neuron_axis=1.5", TypeError, r"neuron_axis for params\[0\] must be an int or None, got 1.5")(
    lambda: core_step(neuron_axis=1.5))
case("torch", "neuron_axis=1.5", TypeError, r"neuron_axis must be an int or None, got 1.5")(
    lambda: torch_step(neuron_axis=1.5))
case("optax", "neuron_axis=1.5", ValueError,
     r"neuron_axis must be an int, None, a callable \(path, leaf\) -> int \| None, or a pytree with the same structure "
     r"as params")(lambda: optax_step(neuron_axis=1.5))
case("core", "neuron_axis=True", TypeError, r"neuron_axis for params\[0\] must be an int or None, got True")(
    lambda: core_step(neuron_axis=True))
case("torch", "neuron_axis=True", TypeError, r"neuron_axis must be an int or None, got True")(
    lambda: torch_step(neuron_axis=True))
case("optax", "neuron_axis=True", TypeError, r"neuron_axis for leaf \['w'\] must be an int or None, got True")(
    lambda: optax_step(neuron_axis=True))

# ---- parameters -------------------------------------------------------------------------------------------------

for name in ("int32", "bool"):
    case("core", f"{name}-params", TypeError,
         rf"params\[0\] has dtype {name}: parameters must be real floating-point arrays")(
        lambda name=name: core_step(params=[np.ones((3, 4), name)]))
    case("torch", f"{name}-params", TypeError,
         rf"Nero needs real floating-point parameters: parameter 0 \(shape \(3, 4\), dtype torch.{name}\)")(
        lambda name=name: torch_step(param=_torch().ones(3, 4, dtype=getattr(_torch(), name))))
    case("optax", f"{name}-params", TypeError, rf"params leaf \['w'\] has dtype {name}: Nero needs real floating-point "
         r"leaves; filter the tree to trainable float arrays")(
        lambda name=name: optax_step(params={"w": _jnp().ones((3, 4), name)}))

case("core", "complex-params", TypeError,
     r"params\[0\] has complex dtype complex64: complex parameters are not supported")(
    lambda: core_step(params=[np.ones((3, 4), np.complex64)]))
case("torch", "complex-params", TypeError,
     r"Nero does not support complex parameters: parameter 0 \(shape \(3, 4\), dtype torch.complex64\)")(
    lambda: torch_step(param=_torch().ones(3, 4, dtype=_torch().complex64)))
case("optax", "complex-params", TypeError, r"params leaf \['w'\] has dtype complex64: Nero needs real floating-point")(
    lambda: optax_step(params={"w": _jnp().ones((3, 4), "complex64")}))
case("torch", "sparse-coo-params", TypeError,
     r"Nero does not support sparse parameters \(torch.sparse_coo\): parameter 0 \(shape \(3, 3\)")(
    lambda: torch_step(param=_torch().nn.Parameter(_torch().eye(3).to_sparse())))
case("torch", "sparse-csr-params", TypeError,
     r"Nero does not support sparse parameters \(torch.sparse_csr\): parameter 0 \(shape \(3, 3\)")(
    lambda: torch_step(param=_torch().nn.Parameter(_torch().eye(3).to_sparse_csr())))
case("core", "python-list-params", TypeError, r"cannot infer the array namespace: the inputs are not arrays")(
    lambda: core_step(params=[[1.0, 2.0]], grads=[[1.0, 2.0]]))
case("optax", "python-float-leaf", TypeError, r"params leaf \['w'\] is a float, not an array")(
    lambda: optax_step(params={"w": 1.0}, grads={"w": 1.0}))
case("torch", "python-float-params", TypeError, r"optimizer can only optimize Tensors")(
    lambda: torch_step(param=1.0))


def _empty_torch():
    import nero_torch

    _torch()
    nero_torch.Nero([])


case("torch", "no-params", ValueError, r"optimizer got an empty parameter list")(_empty_torch)

# ---- gradients --------------------------------------------------------------------------------------------------

case("core", "grad-other-shape", ValueError, r"grads\[0\] has shape \(4, 3\) but params\[0\] has shape \(3, 4\)")(
    lambda: core_step(grads=[np.ones((4, 3))]))
for fused in (True, False):
    for shape in ((4, 3), (1, 4), (3, 1)):  # (1, 4) and (3, 1) would broadcast: they must not
        case("optax", f"grad-shape-{shape}-fused={fused}", ValueError,
             rf"grads leaf \['w'\] has shape {re.escape(str(shape))} but needs \(3, 4\), the shape of its parameter")(
            lambda shape=shape, fused=fused: optax_step(grads={"w": _jnp().ones(shape)}, fused=fused))
case("torch", "grad-other-shape", RuntimeError,
     r"attempting to assign a gradient of size '\[4, 3\]' to a tensor of size")(
    lambda: torch_step(grad=_torch().ones(4, 3)))
case("core", "grad-count", ValueError, r"got 1 gradients for 2 parameters")(
    lambda: core_step(params=[np.ones((3, 4)), np.ones(3)], grads=[np.ones((3, 4))]))
case("optax", "grad-tree", ValueError, r"grads do not match params")(
    lambda: optax_step(grads={"w": _jnp().ones((3, 4)), "b": _jnp().ones(3)}))
case("core", "int-grads", TypeError, r"grads\[0\] has non-floating dtype int32: gradients must be real floating point")(
    lambda: core_step(grads=[np.ones((3, 4), np.int32)]))
case("core", "complex-grads", TypeError,
     r"grads\[0\] has complex dtype complex64: gradients must be real floating point")(
    lambda: core_step(grads=[np.ones((3, 4), np.complex64)]))
case("optax", "int-grads", TypeError, r"grads leaf \['w'\] has dtype int32: Nero needs real floating-point leaves")(
    lambda: optax_step(grads={"w": _jnp().ones((3, 4), "int32")}))
case("optax", "complex-grads", TypeError, r"grads leaf \['w'\] has dtype complex64")(
    lambda: optax_step(grads={"w": _jnp().ones((3, 4), "complex64")}))
case("torch", "int-grads", RuntimeError, r"attempting to assign a gradient with dtype 'int'")(
    lambda: torch_step(grad=_torch().ones(3, 4, dtype=_torch().int32)))
case("torch", "complex-grads", RuntimeError, r"attempting to assign a gradient with dtype 'c10::complex<float>'")(
    lambda: torch_step(grad=_torch().ones(3, 4, dtype=_torch().complex64)))
case("torch", "sparse-csr-grad", RuntimeError,
     r"attempting to assign a gradient to a tensor that has data of a different type")(
    lambda: torch_step(grad=_torch().ones(3, 4).to_sparse_csr()))


def _sparse_embedding_step(**options):
    torch = _torch()
    import nero_torch

    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = nero_torch.Nero([("emb.weight", emb.weight)], **options)
    for _ in range(2):  # the first step, then a later one on another kernel
        opt.zero_grad()
        emb(torch.tensor([1, 2])).sum().backward()
        opt.step()


for label, options in (("foreach", {}), ("core", dict(foreach=False)), ("fused", dict(fused=True))):
    case("torch", f"sparse-coo-grad-{label}", RuntimeError,
         r"Nero does not support sparse gradients: parameter 'emb.weight' \(shape \(10, 4\), dtype torch.float32\)")(
        lambda options=options: _sparse_embedding_step(**options))

# ---- state and call ---------------------------------------------------------------------------------------------

case("core", "state-of-another-kind", TypeError, r"state must be a NeroState \(from nero\(...\).init\), got tuple")(
    lambda: core_step(state=(np.zeros(()),)))
case("core", "state-of-other-shapes", ValueError,
     r"state.v\[0\] has shape \(5,\) but params\[0\] of shape \(3, 4\) needs \(3,\)")(
    lambda: core_step(state=nero_core.nero().init([np.ones((5, 4))])))


def _adam_state():
    optax = pytest.importorskip("optax")
    return optax.adam(0.1).init({"w": _jnp().ones((3, 4))})


def _other_nero_state():
    import nero_optax

    return nero_optax.nero().init({"w": _jnp().ones((3, 5))})


case("optax", "state-of-adam", TypeError,
     r"state must be the NeroState that nero_optax.nero's init returns \(or nero_optax.restore_state gives for a "
     r"checkpoint\), got tuple")(lambda: optax_step(state=_adam_state()))
for fused in (True, False):
    case("optax", f"state-of-other-shapes-fused={fused}", ValueError,
         r"state.v leaf \['w'\] has shape \(5,\) but needs \(4,\), for these params: init the state with them, or "
         r"load a checkpoint with nero_optax.restore_state")(
        lambda fused=fused: optax_step(state=_other_nero_state(), fused=fused))


def _optax_without_params():
    import nero_optax

    params = {"w": _jnp().ones((3, 4))}
    opt = nero_optax.nero()
    opt.update(params, opt.init(params))


case("optax", "no-params-in-update", ValueError,
     r"nero needs the current params: call update\(grads, state, params\); in optax.chain put nero last")(
    _optax_without_params)
case("torch", "fused-and-foreach", RuntimeError, r"`fused` and `foreach` cannot be `True` together.")(
    lambda: torch_step(fused=True, foreach=True))


# ---- accepted: inputs that are not errors, and what they do -----------------------------------------------------


def test_gradients_of_another_float_dtype_are_cast_to_the_compute_dtype():
    """The core and optax take float32 gradients for float64 parameters (and back): the maths runs in the state's
    dtype and the parameters keep their own."""
    p64, g64 = [np.ones((3, 4))], [np.linspace(-1, 1, 12).reshape(3, 4)]
    exact, _ = core_step(params=p64, grads=g64)
    mixed, state = core_step(params=p64, grads=[g.astype(np.float32) for g in g64])
    assert mixed[0].dtype == np.float64 and state.v[0].dtype == np.float64
    np.testing.assert_allclose(mixed[0], exact[0], rtol=1e-6)
    jnp = pytest.importorskip("jax.numpy")
    updates, state = optax_step(params={"w": jnp.ones((3, 4), jnp.float64)},
                                grads={"w": jnp.asarray(g64[0], jnp.float32)})
    assert updates["w"].dtype == jnp.float64 and state.v["w"].dtype == jnp.float64
