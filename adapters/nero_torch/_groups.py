"""``param_groups(model)``: Nero parameter groups with the right neuron axis for each module type."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["param_groups"]

_AXIS_1 = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_WRAPPED = ("_orig_mod.", "module.")  # torch.compile's OptimizedModule, DistributedDataParallel and DataParallel


@dataclass
class Choice:
    """The decision for one parameter: its neuron axis setting, whether it is free (unconstrained), and why."""

    name: str
    param: torch.Tensor
    axis: int | None
    why: str
    free: bool = False


def param_groups(
    model: nn.Module,
    *,
    unconstrained: Iterable[str] = (),
    neuron_axes: Mapping[str, int | None] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Parameter groups for :class:`nero_torch.Nero`, one per (neuron axis, constraint), with parameter names.

    Neurons are the rows a layer's output channels read from, so the neuron axis follows the module's weight
    layout: 0 for ``Linear``, ``Bilinear``, ``Conv*d`` and ``Embedding`` (``(out, in, ...)``; an embedding's
    rows are the vectors it emits), 1 for ``ConvTranspose*d`` (``(in, out, ...)``). Biases and the parameters
    of norm layers (``BatchNorm``, ``LayerNorm``, ``GroupNorm``, ``RMSNorm``, ...) are *bias-like*: they have
    no fan-in to balance, so they are updated elementwise at their own scale. Any other parameter with
    ``ndim >= 2`` takes axis 0, torch's ``(out, in)`` convention. :func:`nero_torch.describe` prints the result.

    ``unconstrained`` names modules (``"head"`` also covers ``"head.*"``) or parameters (``"head.weight"``)
    whose weights keep Nero's per-neuron step but are neither centred nor normalised: an output layer whose
    logits need a free scale (see the quickstart for when). A tied weight is unconstrained if any module that
    uses it is. ``neuron_axes`` sets the axis of named modules' or parameters' tensors (None: bias-like), e.g.
    ``{"pos_embedding": 1}`` for a raw ``(1, T, d)`` positional embedding, one neuron per position. A name that
    matches nothing is an error naming the closest names. A model wrapped by ``torch.compile`` or
    ``DistributedDataParallel`` is read through its wrapper, so its names lack ``_orig_mod.`` and ``module.``
    (names given with them work too).

    ``options`` (``lr``, ``beta``, ...) go into every group.
    """
    groups: dict[tuple[int | None, bool], dict[str, Any]] = {}
    for c in choices(model, unconstrained, neuron_axes or {}):
        key = (c.axis, c.free and c.axis is not None)
        if key not in groups:
            groups[key] = {"params": [], "neuron_axis": c.axis, **options}
            if key[1]:
                groups[key].update(centre=False, normalise=False)
        groups[key]["params"].append((c.name, c.param))
    return list(groups.values())


def choices(model: nn.Module, unconstrained: Iterable[str], neuron_axes: Mapping[str, int | None]) -> list[Choice]:
    """The decision for every parameter of ``model`` (a tied parameter once, under its first name)."""
    if isinstance(unconstrained, str):
        raise TypeError(f"unconstrained must be a list of names, got the string {unconstrained!r}")
    model = _unwrapped(model)
    free, axes = [_bare(f) for f in unconstrained], {_bare(k): v for k, v in neuron_axes.items()}
    _check_names(model, free, "unconstrained")
    _check_names(model, list(axes), "neuron_axes")
    found: dict[int, Choice] = {}
    for module_name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{local}" if module_name else local
            axis, why = _neuron_axis(module, local, p.ndim)
            given = [k for k in axes if _covers(k, module_name, name)]
            if given:  # the most specific name wins
                key = max(given, key=len)
                axis, why = axes[key], f"neuron_axes[{key!r}]"
            is_free = any(_covers(f, module_name, name) for f in free)
            if id(p) in found:  # a shared (tied) parameter: its first name and axis; free if any use is
                found[id(p)].free |= is_free
            else:
                found[id(p)] = Choice(name, p, axis, why, is_free)
    return list(found.values())


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``'s and data-parallel wrappers (their parameters are the same tensors)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def _bare(name: str) -> str:
    """A name without the prefixes the wrappers add."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPED:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def _covers(entry: str, module_name: str, param_name: str) -> bool:
    return module_name == entry or module_name.startswith(entry + ".") or param_name == entry


def _check_names(model: nn.Module, entries: list[str], argument: str) -> None:
    """Every entry must name a module or a parameter of ``model``; else an error naming the closest names."""
    modules = [name for name, _ in model.named_modules() if name]
    known = set(modules) | {name for name, _ in model.named_parameters()}
    for entry in entries:
        if entry not in known and not any(m.startswith(entry + ".") for m in modules):
            close = difflib.get_close_matches(entry, sorted(known), n=4, cutoff=0.5)
            hint = f"closest names: {close}" if close else f"its modules: {modules[:8]}"
            raise ValueError(f"{argument} entry {entry!r} matches no module or parameter of the model; {hint}")


def _neuron_axis(module: nn.Module, local_name: str, ndim: int) -> tuple[int | None, str]:
    kind = type(module).__name__
    if ndim < 2:
        return None, "ndim < 2"
    if isinstance(module, _NORMS):
        return None, f"a {kind} parameter"
    if "bias" in local_name:
        return None, "named like a bias"
    if isinstance(module, _AXIS_1):
        return 1, f"{kind} weight (in, out, *kernel)"
    if isinstance(module, nn.Embedding):
        return 0, f"{kind} weight (vocab, dim): one neuron per row"
    if isinstance(module, (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)):
        return 0, f"{kind} weight (out, in, ...)"
    return 0, f"a parameter of {kind}: torch's (out, in, ...) layout"


def named_like(groups: list[dict[str, Any]], group: dict[str, Any]) -> dict[str, Any]:
    """``group`` made to fit an optimizer's existing ``groups``, which torch requires to be all named or all
    unnamed: the names of a named group (``(name, tensor)`` pairs or ``param_names``, as :func:`param_groups`
    makes) are dropped where the groups have none; an unnamed group added to named groups is a clear error."""
    if not groups or not isinstance(group, dict):
        return group
    params = group["params"]
    params = [params] if isinstance(params, torch.Tensor) else params
    if isinstance(params, set):
        return group  # torch's own error: sets have no order
    params = list(params)
    named = "param_names" in group or any(isinstance(p, tuple) for p in params)
    if named and "param_names" not in groups[0]:
        bare = {k: v for k, v in group.items() if k != "param_names"}
        return {**bare, "params": [p[1] if isinstance(p, tuple) else p for p in params]}
    if not named and "param_names" in groups[0]:
        raise ValueError(
            "this optimizer's parameter groups carry names (from nero_torch.param_groups or named_parameters()), "
            "so an added group needs them too: pass a group from nero_torch.param_groups(module), or its "
            "parameters as (name, tensor) pairs, e.g. list(module.named_parameters())"
        )
    return {**group, "params": params}
