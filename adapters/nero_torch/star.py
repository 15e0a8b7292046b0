"""STAR as a ``torch.optim.Optimizer`` that calls the array-API core rule on each parameter group."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable

import numpy as np
import torch

from nero_core._star import StarState, load_star_params
from nero_core._star import star as star_rule

__all__ = ["Star"]


class Star(torch.optim.Optimizer):
    r"""STAR, the stabilised learned optimizer (Harrison, Metz & Sohl-Dickstein, NeurIPS 2022).

    Per element, from momenta :math:`m_{1..3}` (decays 0.9, 0.99, 0.999), the second moment :math:`v` (0.999) and
    Adafactor accumulators, a 39-input MLP (the meta-parameters) gives a direction :math:`d` and the log-scales
    :math:`\mu, \nu, \rho`; then

    .. math::
        p \leftarrow (1 - \lambda e^{10^{-3}\rho})\,p
            - \alpha\, d\, e^{10^{-3}\mu} / \sqrt{v + 10^{-6}}
            - \eta\, e^{10^{-3}\nu}\, \bar m / \sqrt{v + 10^{-6}}

    with :math:`\alpha` = ``step_mult``, :math:`\eta` = ``nominal_stepsize`` (the AdamAggMo nominal term, :math:`\bar m`
    the mean of the three momenta) and :math:`\lambda` = ``weight_decay``. The maths is :func:`nero_core.star`; this
    class only gathers parameters and gradients and writes the result back in place.

    Args:
        params: parameters or parameter groups.
        meta_params: the MLP weights (a mapping of arrays), the name of a shipped set, or None for ``"star_v1"``.
        step_mult: as in :func:`nero_core.star`; per group.
        nominal_stepsize: as in :func:`nero_core.star`; per group.
        weight_decay: as in :func:`nero_core.star`; per group.
        skip_nonfinite: skip a group's step (counting it in ``state["skipped"]``) when a gradient is not finite.
    """

    def __init__(
        self,
        params: Iterable[Any],
        meta_params: Mapping[str, Any] | str | None = None,
        *,
        step_mult: float = 1e-3,
        nominal_stepsize: float = 1e-3,
        weight_decay: float = 0.0,
        skip_nonfinite: bool = True,
    ) -> None:
        if meta_params is None or isinstance(meta_params, str):
            meta_params = load_star_params(meta_params or "star_v1")
        self._meta = {k: np.asarray(v) for k, v in meta_params.items()}
        star_rule(self._meta, step_mult=step_mult, nominal_stepsize=nominal_stepsize, weight_decay=weight_decay)
        defaults = dict(step_mult=step_mult, nominal_stepsize=nominal_stepsize, weight_decay=weight_decay,
                        skip_nonfinite=skip_nonfinite)
        super().__init__(params, defaults)

    def _rule(self, group: dict[str, Any]):
        return star_rule(self._meta, step_mult=group["step_mult"], nominal_stepsize=group["nominal_stepsize"],
                         weight_decay=group["weight_decay"], skip_nonfinite=group["skip_nonfinite"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("Star does not support sparse gradients")
            rule = self._rule(group)
            fresh = [p for p in params if not self.state[p]]
            if fresh:
                init = rule.init([p.detach() for p in fresh])
                for i, p in enumerate(fresh):
                    self.state[p].update(step=init.count.clone(), skipped=init.skipped.clone(), m=init.m[i],
                                         v=init.v[i], fac_row=init.fac_row[i], fac_col=init.fac_col[i])
            states = [self.state[p] for p in params]
            state = StarState(
                states[0]["step"], tuple(s["m"] for s in states), tuple(s["v"] for s in states),
                tuple(s["fac_row"] for s in states), tuple(s["fac_col"] for s in states), states[0]["skipped"],
            )
            new_params, state = rule.update([p.grad for p in params], state, [p.detach() for p in params])
            for i, (p, s) in enumerate(zip(params, states)):
                p.copy_(new_params[i])
                s.update(step=state.count, skipped=state.skipped, m=state.m[i], v=state.v[i],
                         fac_row=state.fac_row[i], fac_col=state.fac_col[i])
        return loss
