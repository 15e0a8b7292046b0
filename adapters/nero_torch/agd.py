"""Automatic gradient descent as a ``torch.optim.Optimizer``, on nero_core's array-API rule."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from nero_core._agd import AGDState, Layout, agd, agd_init

__all__ = ["AGD"]


class AGD(torch.optim.Optimizer):
    r"""Automatic gradient descent (Bernstein, Mingard, Huang, Azizan & Yue, 2023): no learning rate to tune.

    The parameters are one network, in forward order. Its *weights* (``ndim >= 2``, ``(out, in, *kernel)``) number
    ``L``; each has the scale :math:`s_W = \sqrt{d_{out}/d_{in}}/\sqrt{k}`, ``k`` the kernel size. Every step:

    .. math::
        n_{W,s} = \|\nabla W_{:,:,s}\|_F,\quad G = \frac1L \sum_W s_W \sum_s n_{W,s},\quad
        \eta = \log\frac{1 + \sqrt{1 + 4G}}{2},\quad
        W_{:,:,s} \leftarrow W_{:,:,s} - \mathrm{gain}\,\frac{\eta}{L}\, s_W\, \frac{\nabla W_{:,:,s}}{n_{W,s}}.

    A bias (any tensor with ``ndim < 2``) follows the weight before it: ``p -= gain * (eta/L) * s_W * grad p /
    ||grad W||_F`` (an extension beyond the paper, whose networks have no biases). A parameter without a gradient
    counts as a zero gradient: it stays put but still counts in ``L``.

    Call :meth:`init_weights` once before training for the paper's initialisation (every ``(out, in)`` slice
    orthogonal, times ``s_W``); :meth:`step` returns ``eta`` as a Python float for logging (which waits for the
    device). ``eta``, the step count and the count of skipped (non-finite) steps are kept in the state of the first
    parameter, so they travel with ``state_dict()``.

    The gain is the group's ``lr`` entry, the one torch's learning-rate schedulers set, so a scheduler scales it
    (``StepLR``, ``CosineAnnealingLR``, ``LambdaLR``; ``OneCycleLR`` with ``cycle_momentum=False``).

    Args:
        params: the model's parameters in forward order (``model.parameters()``, or a list); one group only,
            because ``eta`` couples every layer.
        gain: multiplies every step (1: the paper's AGD); kept as the group's ``lr``.
        layout: the weights' ``(out, in)`` axes, as in :func:`nero_core.agd` (``"torch"``; give ``(1, 0)`` for a
            ``ConvTranspose`` weight in a per-parameter list).
        skip_nonfinite: leave everything as it was when a gradient holds NaN or Inf, counting the step.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        gain: float = 1.0,
        *,
        layout: Layout = "torch",
        skip_nonfinite: bool = True,
    ) -> None:
        agd(gain)  # validates gain
        super().__init__(params, dict(lr=gain))
        if len(self.param_groups) != 1:
            raise ValueError("AGD treats the parameters as one network: pass one ordered list, not parameter groups")
        self._layout = layout
        self._skip_nonfinite = skip_nonfinite

    def __setstate__(self, state: dict[str, Any]) -> None:
        for group in state["param_groups"]:  # saved when the gain was the group's "gain"
            if "gain" in group:
                group.setdefault("lr", group.pop("gain"))
        super().__setstate__(state)

    def _parameters(self) -> list[torch.Tensor]:
        return self.param_groups[0]["params"]

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Set every weight to the paper's initialisation, in place, from ``numpy.random.default_rng(seed)``."""
        params = self._parameters()
        for p, new in zip(params, agd_init([p.detach() for p in params], seed, layout=self._layout)):
            if new is not p:
                p.copy_(new)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> float:  # type: ignore[override]
        """Take one step and return its ``eta`` (the closure, if given, is called first to compute gradients)."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        params = self._parameters()
        for i, p in enumerate(params):
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"AGD does not support sparse gradients (parameter {i})")
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        rule = agd(self.param_groups[0]["lr"], layout=self._layout, skip_nonfinite=self._skip_nonfinite)
        slot = self.state[params[0]]
        state = rule.init([p.detach() for p in params])
        if slot:  # load_state_dict casts floating state to the parameter's dtype: cast it back
            state = AGDState(*(slot[name].to(fresh) for name, fresh in zip(AGDState._fields, state)))
        new_params, state = rule.update(grads, state, [p.detach() for p in params])
        for p, new in zip(params, new_params):
            p.copy_(new)
        slot.update(state._asdict())
        return float(state.eta)
