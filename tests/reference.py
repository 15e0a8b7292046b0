"""An independent float64 NumPy transcription of the maths in docs/design.md, neuron by neuron.

Written with explicit loops over neurons and none of nero_core's helpers, so that agreement with the
array-API rule means something.
"""

from __future__ import annotations

import math

import numpy as np


def _neuron_axis(shape, axis):
    if axis is None or len(shape) < 2:
        return None
    axis %= len(shape)
    fan_in = math.prod(s for i, s in enumerate(shape) if i != axis)
    return axis if fan_in >= 2 else None


def _project(row, centre, normalise):
    row = row.copy()
    if centre:
        row -= row.mean()
    if normalise:
        norm = math.sqrt(float(np.sum(row * row)))
        if norm > 0:
            row /= norm
    return row


class ReferenceNero:
    """Nero in float64, one tensor and one neuron at a time."""

    def __init__(self, shapes, axes, lr=0.01, beta=0.999, centre=True, normalise=True, skip_nonfinite=False):
        """``skip_nonfinite="neuron"``: a neuron whose new v is not finite keeps its weights and v (the
        whole-step skip is checked by the tests directly)."""
        self.lr, self.beta, self.centre, self.normalise = lr, beta, centre, normalise
        self.per_neuron = skip_nonfinite == "neuron"
        self.axes = [_neuron_axis(tuple(s), a) for s, a in zip(shapes, axes)]
        self.t = [0] * len(shapes)
        self.v = [None] * len(shapes)
        self.sigma = [None] * len(shapes)

    def step(self, params, grads):
        return [self._step_tensor(i, np.array(p, np.float64), np.array(g, np.float64)) for i, (p, g) in
                enumerate(zip(params, grads))]

    def _step_tensor(self, i, p, g):
        axis = self.axes[i]
        if axis is None:
            return self._step_elementwise(i, p, g)
        w = np.moveaxis(p, axis, 0).reshape(p.shape[axis], -1) if p.size else np.zeros((p.shape[axis], 0))
        before = w.copy()
        gw = np.moveaxis(g, axis, 0).reshape(g.shape[axis], -1) if g.size else np.zeros((g.shape[axis], 0))
        constrained = self.centre or self.normalise
        if self.t[i] == 0:
            if constrained:
                w = np.stack([_project(r, self.centre, self.normalise) for r in w]) if len(w) else w
            if self.normalise:
                self.sigma[i] = 1.0
            else:
                norms = [math.sqrt(float(np.sum(r * r))) for r in w]
                mean = sum(norms) / len(norms) if norms else 0.0
                self.sigma[i] = mean if mean > 0 else 1.0  # all rows zero (a zero head): a unit row's norm
            self.v[i] = np.zeros(w.shape[0])
        self.t[i] += 1
        t, beta = self.t[i], self.beta
        out = np.empty_like(w)
        for n in range(w.shape[0]):
            v_n = beta * self.v[i][n] + (1 - beta) * float(np.sum(gw[n] * gw[n]))
            if self.per_neuron and not math.isfinite(v_n):
                out[n] = before[n]
                continue
            self.v[i][n] = v_n
            vhat = self.v[i][n] / (1 - beta**t)
            u = gw[n] / math.sqrt(vhat) if self.v[i][n] > 0 else np.zeros_like(gw[n])
            row = w[n] - self.lr * self.sigma[i] * u
            out[n] = _project(row, self.centre, self.normalise) if constrained else row
        moved = (p.shape[axis],) + tuple(s for k, s in enumerate(p.shape) if k != axis)
        return np.moveaxis(out.reshape(moved), 0, axis)

    def _step_elementwise(self, i, p, g):
        if self.t[i] == 0:
            mean = float(np.mean(np.abs(p))) if p.size else 0.0
            self.sigma[i] = mean if mean > 0 else 0.01
            self.v[i] = np.zeros(p.shape)
        self.t[i] += 1
        beta = self.beta
        new_v = beta * self.v[i] + (1 - beta) * g * g
        held = ~np.isfinite(new_v) if self.per_neuron else np.zeros(p.shape, bool)
        self.v[i] = np.where(held, self.v[i], new_v)
        vhat = self.v[i] / (1 - beta ** self.t[i])
        u = np.zeros_like(g)
        nz = (self.v[i] > 0) & ~held
        u[nz] = g[nz] / np.sqrt(vhat[nz])
        return np.where(held, p, p - self.lr * self.sigma[i] * u)
