"""Bad input to the core gets a clear error naming the argument or parameter, on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest

import nero_core


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=-0.1), r"lr must be a finite number in \[0.0, inf\], got -0.1"),
        (dict(lr=math.nan), r"lr must be a finite number in \[0.0, inf\], got nan"),
        (dict(lr=math.inf), r"lr must be a finite number in \[0.0, inf\], got inf"),
        (dict(beta=1.0), r"beta must be a finite number in \[0.0, 1.0\), got 1.0"),
        (dict(beta=-0.5), r"beta must be a finite number in \[0.0, 1.0\), got -0.5"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nero_core.nero(**kwargs)


def test_integer_parameters(backend):
    params = [backend.asarray(np.zeros((3, 4))), backend.asarray(np.arange(6).reshape(2, 3))]
    with pytest.raises(TypeError, match=r"params\[1\] has dtype .*int.*: parameters must be real floating-point"):
        nero_core.nero().init(params)


def test_complex_parameters(backend):
    if backend.name == "array_api_strict":
        pass  # strict supports complex dtypes too
    params = [backend.asarray(np.zeros((3, 4), dtype=np.complex64))]
    with pytest.raises(TypeError, match=r"params\[0\] has complex dtype .*: complex parameters are not supported"):
        nero_core.nero().init(params)


def test_gradient_shape_and_count_mismatch(backend):
    opt = nero_core.nero()
    params = [backend.asarray(np.ones((3, 4))), backend.asarray(np.ones(3))]
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"got 1 gradients for 2 parameters"):
        opt.update([backend.asarray(np.ones((3, 4)))], state, params)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(4,\) but params\[1\] has shape \(3,\)"):
        opt.update([backend.asarray(np.ones((3, 4))), backend.asarray(np.ones(4))], state, params)


def test_complex_gradients(backend):
    opt = nero_core.nero()
    params = [backend.asarray(np.ones((3, 4)))]
    state = opt.init(params)
    with pytest.raises(TypeError, match=r"grads\[0\] has complex dtype .*: gradients must be real floating point"):
        opt.update([backend.asarray(np.ones((3, 4), dtype=np.complex128))], state, params)


def test_state_of_other_shapes_is_refused(backend):
    opt = nero_core.nero()
    state = opt.init([backend.asarray(np.ones((3, 4)))])
    params = [backend.asarray(np.ones((5, 4)))]
    with pytest.raises(ValueError, match=r"state.v\[0\] has shape \(3,\) but params\[0\] of shape \(5, 4\) needs \(5,\)"):
        opt.update([backend.asarray(np.ones((5, 4)))], state, params)


@pytest.mark.parametrize(
    ("axis", "error", "message"),
    [
        (2, ValueError, r"neuron_axis 2 is out of range for params\[0\] of shape \(3, 4\) \(ndim 2\)"),
        (-3, ValueError, r"neuron_axis -3 is out of range for params\[0\] of shape \(3, 4\) \(ndim 2\)"),
        (1.0, TypeError, r"neuron_axis for params\[0\] must be an int or None, got 1.0"),
        ([0, 0], ValueError, r"neuron_axis has 2 entries but there are 1 parameters"),
    ],
)
def test_bad_neuron_axis(axis, error, message):
    with pytest.raises(error, match=message):
        nero_core.nero(neuron_axis=axis).init([np.ones((3, 4))])
