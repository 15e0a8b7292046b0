"""The balanced-network property the property tests check: every neuron row zero-mean and unit-norm."""

from __future__ import annotations

import math

import numpy as np

import nero_core

# Unit roundoff of each dtype: the rows are balanced to a few of these per sqrt(fan-in).
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}


def check_balanced(p: np.ndarray, shape, axis, dtype_name: str) -> None:
    """Every row of ``p`` along its neuron axis is zero-mean and unit-norm (a zero row may stay zero)."""
    resolved = nero_core.neuron_axes([shape], axis)[0]
    if resolved is None or p.size == 0:
        return
    rows = np.moveaxis(p, resolved, 0).reshape(shape[resolved], -1).astype(np.float64)
    norms = np.linalg.norm(rows, axis=1)
    tol = 8 * EPS[dtype_name] * math.sqrt(rows.shape[1])
    zero = norms == 0
    np.testing.assert_allclose(norms[~zero], 1.0, atol=tol)
    np.testing.assert_allclose(rows.mean(axis=1), 0.0, atol=tol)
