"""The optimizers the studies compare, each built from a model and one learning rate.

``make_optimizer(name, model, lr)`` gives a torch optimizer (Muon gives Muon and Adam chained, as users run it:
Muon on the hidden 2-D weights, Adam on everything else).
"""

from __future__ import annotations

from collections.abc import Callable

import nero_torch
import torch
from torch import nn

__all__ = [
    "LR_GRID", "NERO_DEFAULT_LR", "OPTIMIZERS", "Chain", "agd", "hidden_matrices", "make_optimizer", "muon", "nero",
]

LR_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
NERO_DEFAULT_LR = 0.01


class Chain:
    """Several optimizers stepped as one (each owns a disjoint set of parameters)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


def nero(model: nn.Module, lr: float = NERO_DEFAULT_LR, **options) -> torch.optim.Optimizer:
    """nero_torch.Nero on every parameter of ``model``, with the neuron axis of each module type, every layer
    constrained but a one-output linear layer (a value head, a discriminator's logit: one balanced neuron would fix
    the output's scale, and Nero's audit says to leave it free). ``options``: ``centre``, ``normalise``."""
    single = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == 1]
    return nero_torch.Nero(nero_torch.param_groups(model, unconstrained=single), lr=lr, **options)


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The hidden 2-D weights: the Linear layers of each Sequential but its first and last (an MLP's input and
    output layers), and the attention and feed-forward matrices of transformer blocks. Conv filters are not
    matrices: torch.optim.Muon takes 2-D parameters only."""
    hidden: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            linears = [m for m in module if isinstance(m, nn.Linear)]
            hidden += [m.weight for m in linears[1:-1]]
        elif isinstance(module, nn.MultiheadAttention):
            hidden += [module.in_proj_weight, module.out_proj.weight]
        elif isinstance(module, nn.TransformerEncoderLayer):
            hidden += [module.linear1.weight, module.linear2.weight]
    return hidden


def muon(model: nn.Module, lr: float, adam_lr: float) -> Chain:
    """torch.optim.Muon on the hidden 2-D weights at ``lr``, Adam on the rest at ``adam_lr`` (torch defaults)."""
    hidden = hidden_matrices(model)
    chosen = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    optimizers = [torch.optim.Adam(rest, lr=adam_lr)]
    if hidden:
        optimizers.insert(0, torch.optim.Muon(hidden, lr=lr))
    return Chain(*optimizers)


def agd(model: nn.Module, lr: float = 1.0) -> torch.optim.Optimizer:
    """nero_torch.AGD over ``model``'s parameters in forward order. AGD has no learning rate: the ``lr`` slot is
    its gain (1 is the paper's AGD)."""
    return nero_torch.AGD(model.parameters(), gain=lr)


def lamb(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    from pytorch_optimizer import Lamb

    return Lamb(model.parameters(), lr=lr)


OPTIMIZERS: dict[str, Callable[..., object]] = {
    "nero": nero,
    "sgd": lambda model, lr: torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
    "adam": lambda model, lr: torch.optim.Adam(model.parameters(), lr=lr),
    "lamb": lamb,
    "muon": muon,
    "agd": agd,
}


def make_optimizer(name: str, model: nn.Module, lr: float, **options):
    """Optimizer ``name`` (a key of OPTIMIZERS) over ``model``'s parameters."""
    return OPTIMIZERS[name](model, lr, **options)
