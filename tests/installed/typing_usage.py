"""A user's program, type-checked with ``mypy --strict`` against the installed wheel (``make wheel-check``): the
public API must carry type hints (``py.typed`` shipped, every call typed), and these uses must check. Not a test
module: mypy reads it, nothing runs it."""

from __future__ import annotations

import numpy as np
import optax  # type: ignore[import-untyped]  # optax ships no hints
import torch

import nero_core
import nero_optax
import nero_torch


def core_step(params: list[np.ndarray], grads: list[np.ndarray]) -> list[np.ndarray]:
    opt: nero_core.Optimizer = nero_core.nero(lr=0.01, beta=0.999, neuron_axis=0)
    state: nero_core.NeroState = opt.init(params)
    new, state = opt.update(grads, state, params)
    balanced: list[np.ndarray] = list(nero_core.balanced(new))
    axes: tuple[int | None, ...] = nero_core.neuron_axes([p.shape for p in params], 0)
    agd: nero_core.Optimizer = nero_core.agd(1.0)
    star: nero_core.Optimizer = nero_core.star()
    meta: dict[str, np.ndarray] = nero_core.load_star_params()
    version: str = nero_core.__version__
    del axes, agd, star, meta, version
    return balanced


def torch_optimizers(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    groups = nero_torch.param_groups(model, lr=0.01)
    nero: torch.optim.Optimizer = nero_torch.Nero(groups, lr=0.01, fused=True, skip_nonfinite="neuron")
    agd: torch.optim.Optimizer = nero_torch.AGD(model.parameters(), gain=1.0)
    star: torch.optim.Optimizer = nero_torch.Star(model.parameters())
    return [nero, agd, star]


def optax_transforms() -> list[optax.GradientTransformation]:
    return [
        nero_optax.nero(learning_rate=0.01, neuron_axis=nero_optax.flax_neuron_axis),
        nero_optax.agd(1.0),
        nero_optax.star(),
    ]
