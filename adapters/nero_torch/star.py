"""STAR as a ``torch.optim.Optimizer``: the accumulators updated in place, then the core rule's step per tensor."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable

import numpy as np
import torch

import array_api_compat.torch as xp
from nero_core._base import check_gradients
from nero_core._star import (
    DEFAULT_PARAMS, MOMENTUM_DECAYS, RMS_DECAY, _adafactor_accumulate, _meta_arrays, _step, load_star_params,
)
from nero_core._star import star as star_rule

from ._star_step import step_in_place

__all__ = ["Star"]

BLOCK_SIZE = 1 << 15  # elements per block of the per-element MLP: temporaries stay small (nero_core.star)


class Star(torch.optim.Optimizer):
    r"""STAR, the stabilised learned optimizer (Harrison, Metz & Sohl-Dickstein, NeurIPS 2022).

    Per element, from momenta :math:`m_{1..3}` (decays 0.9, 0.99, 0.999), the second moment :math:`v` (0.999) and
    Adafactor accumulators, a 39-input MLP (the meta-parameters) gives a direction :math:`d` and the log-scales
    :math:`\mu, \nu, \rho`; then

    .. math::
        p \leftarrow (1 - \lambda e(\rho))\,p
            - \alpha\, \|a\|_{\mathrm{rms}} \tanh(d)\, e(\mu)
            - \eta\, e(\nu)\, a,

    where :math:`a = \bar m / \sqrt{v + 10^{-6}}`, :math:`e(x) = \exp(\mathrm{clip}(10^{-3}x, -1, 1))`,
    :math:`\alpha` = ``step_mult``, :math:`\eta` = ``nominal_stepsize`` (the AdamAggMo nominal term, :math:`\bar m`
    the mean of the three momenta, :math:`\|a\|_{\mathrm{rms}}` the root mean square of :math:`a` over the tensor) and
    :math:`\lambda` = ``weight_decay``: the learned step is at most :math:`e^2 \alpha / \eta` times the nominal one (per
    tensor, in root mean square). The maths is :func:`nero_core.star`; this class updates the accumulators in place
    with torch's multi-tensor kernels, then runs the core rule's step on each tensor in blocks of ``BLOCK_SIZE``
    elements and writes the result back in place.

    Args:
        params: parameters or parameter groups.
        meta_params: the MLP weights (a mapping of arrays), the name of a shipped set, or None for the default set
            (``nero_core._star.DEFAULT_PARAMS``, ``"star_v2"``).
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
            meta_params = load_star_params(meta_params or DEFAULT_PARAMS)
        self._meta = {k: np.asarray(v) for k, v in meta_params.items()}
        star_rule(self._meta, step_mult=step_mult, nominal_stepsize=nominal_stepsize, weight_decay=weight_decay)
        defaults = dict(step_mult=step_mult, nominal_stepsize=nominal_stepsize, weight_decay=weight_decay,
                        skip_nonfinite=skip_nonfinite)
        super().__init__(params, defaults)

    def _weights(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        cache = self.__dict__.setdefault("_weights_by", {})  # per (dtype, device); not part of the state_dict
        key = (like.dtype, like.device)
        if key not in cache:
            cache[key] = _meta_arrays(self._meta, xp, like.dtype, like)
        return cache[key]

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        init = star_rule(self._meta).init([p.detach()])
        self.state[p].update(step=init.count, skipped=init.skipped, m=init.m[0], v=init.v[0],
                             fac_row=init.fac_row[0], fac_col=init.fac_col[0])

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
            check_gradients(xp, [p.grad for p in params], [p.detach() for p in params])
            for p in params:
                if not self.state[p]:
                    self._init_state(p, group)
            states = [self.state[p] for p in params]
            count, skipped = states[0]["step"], states[0]["skipped"]
            if group["skip_nonfinite"] and not _all_finite([p.grad for p in params]):
                for s in states:  # the step is skipped whole
                    s["step"], s["skipped"] = count, skipped + 1
                continue
            grads = [p.grad.to(s["v"].dtype) for p, s in zip(params, states)]
            _accumulate_in_place(grads, states)
            hyper = {k: group[k] for k in ("step_mult", "nominal_stepsize", "weight_decay")}
            for p, g, s in zip(params, grads, states):
                if p.numel() == 0:
                    continue
                args = (g, count, s["m"], s["v"], s["fac_row"], s["fac_col"], self._weights(s["v"]))
                if p.dtype == s["v"].dtype and p.is_contiguous():
                    step_in_place(p.detach(), *args, block_size=BLOCK_SIZE, **hyper)
                else:  # half-precision or strided parameters: the core rule, then a copy
                    p.copy_(_step(p.detach(), *args, block_size=BLOCK_SIZE, xp=xp, **hyper))
            for s in states:
                s["step"], s["skipped"] = count + 1, skipped
        return loss


def _all_finite(grads: list[torch.Tensor]) -> bool:
    """Whether every gradient is finite: one float64 sum per tensor (a NaN or Inf makes it NaN or Inf; it reads the
    gradient once, where ``isfinite`` makes three passes), checked element by element only when a sum is not
    finite (a finite float64 gradient near the largest double can overflow its sum). A host sync, as Nero's."""
    sums = torch.stack([g.sum(dtype=torch.float64) for g in grads])
    return bool(sums.isfinite().all()) or all(bool(g.isfinite().all()) for g in grads)


def _accumulate_in_place(grads: list[torch.Tensor], states: list[dict[str, Any]]) -> None:
    """The core's accumulator update (``nero_core._star._moments``, ``_adafactor_accumulate``) written into the
    state tensors in place with torch's multi-tensor kernels, instead of new tensors every step: the momenta
    ``m_i += (1 - b_i) * (g - m_i)``, ``v = 0.999 * v + 0.001 * g * g``, and the Adafactor rows and columns."""
    for i, decay in enumerate(MOMENTUM_DECAYS):
        torch._foreach_lerp_([s["m"][i] for s in states], grads, 1 - decay)
    vs = [s["v"] for s in states]
    torch._foreach_mul_(vs, RMS_DECAY)
    torch._foreach_addcmul_(vs, grads, grads, value=1 - RMS_DECAY)
    for g, s in zip(grads, states):
        if g.numel():
            s["fac_row"], s["fac_col"] = _adafactor_accumulate(g, s["fac_row"], s["fac_col"], xp)
