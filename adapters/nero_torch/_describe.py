"""The role audit for torch: :func:`describe` prints what Nero does with every parameter, and
:func:`warn_suspicious` warns, when an optimizer is built, about the settings that look like mistakes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nero_core._audit import (
    Role, format_roles, positions_axis, role_of, suspicions, warn_from_user_code, warning_text,
)

from ._groups import choices

__all__ = ["describe", "warn_suspicious"]


def describe(model_or_optimizer: nn.Module | torch.optim.Optimizer, **param_groups_options: Any) -> list[Role]:
    """Print and return one row per parameter tensor: name, shape, role (neuron tensor, bias-like,
    unconstrained), neuron axis, neuron count, fan-in, and why.

    Given a model, the rows are what :func:`nero_torch.param_groups` would decide for it with the same
    ``param_groups_options`` (``unconstrained``, ``neuron_axes``, ``centre``, ``normalise``); given a
    :class:`nero_torch.Nero`, what its parameter groups say.
    """
    if isinstance(model_or_optimizer, nn.Module):
        rows = _model_roles(model_or_optimizer, **param_groups_options)
    elif _is_nero(model_or_optimizer):
        if param_groups_options:
            raise TypeError("options go with a model: an optimizer's groups already hold them")
        rows = _optimizer_roles(model_or_optimizer)
    else:
        raise TypeError(f"describe takes a torch model or a nero_torch.Nero, got {type(model_or_optimizer).__name__}")
    print(format_roles(rows))
    return rows


def _model_roles(
    model: nn.Module, *, unconstrained: Any = (), neuron_axes: Any = None, centre: bool = True,
    normalise: bool = True, **_: Any,
) -> list[Role]:
    rows = []
    for c in choices(model, unconstrained, neuron_axes or {}):
        why = c.why + ("; named in unconstrained" if c.free and c.axis is not None else "")
        constrained = not c.free and (centre or normalise)
        rows.append(role_of(c.name, tuple(c.param.shape), c.axis, constrained=constrained, why=why))
    return rows


def _optimizer_roles(optimizer: torch.optim.Optimizer) -> list[Role]:
    rows, index = [], 0
    for k, group in enumerate(optimizer.param_groups):
        names = group.get("param_names") or [f"params[{index + i}]" for i in range(len(group["params"]))]
        index += len(group["params"])
        rows += [_group_role(name, p, group, k) for name, p in zip(names, group["params"])]
    return rows


def _group_role(name: str, p: torch.Tensor, group: dict[str, Any], k: int) -> Role:
    constrained = bool(group["centre"] or group["normalise"])
    why = f"group {k}: neuron_axis={group['neuron_axis']}" + ("" if constrained else ", centre and normalise off")
    return role_of(name, tuple(p.shape), group["neuron_axis"], constrained=constrained, why=why)


def _is_nero(optimizer: Any) -> bool:
    from ._optimizer import Nero  # a cycle otherwise: the optimizer warns through this module

    return isinstance(optimizer, Nero)


_FIXES = {
    "one_neuron": (
        "if it is an output layer with one output, leave it free (param_groups(model, unconstrained=[{module!r}])); "
        "if its neurons lie on another axis, name it (param_groups(model, neuron_axes={{{name!r}: <axis>}}))"
    ),
    "kernel_axis": "torch's layout is (out, in, *kernel): neuron_axis=0 (1 for ConvTranspose)",
    "bias": "make it bias-like: param_groups(model, neuron_axes={{{name!r}: None}})",
    "positional": "param_groups(model, neuron_axes={{{name!r}: {positions}}})",
}


def warn_suspicious(group: dict[str, Any], offset: int) -> None:
    """A ``ConfigWarning`` for each tensor of a new Nero group whose role looks like a mistake, naming the
    tensor and the fix (``offset``: the index of the group's first parameter in the optimizer)."""
    names = group.get("param_names") or [f"params[{offset + i}]" for i in range(len(group["params"]))]
    for name, p in zip(names, group["params"]):
        row = _group_role(repr(name) if group.get("param_names") else name, p, group, 0)
        found = suspicions(row, name.split(".")[-1])
        if found:
            module = name.rsplit(".", 1)[0] if "." in name else name
            fix = _FIXES[next(iter(found))].format(name=name, module=module, positions=positions_axis(row.shape))
            warn_from_user_code(warning_text(row, found, fix), ("torch", "nero_torch"))
