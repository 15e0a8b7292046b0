"""``param_groups(model)``: Nero parameter groups with the right neuron axis for each module type."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["param_groups"]

_AXIS_1 = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def param_groups(model: nn.Module, *, unconstrained: Iterable[str] = (), **options: Any) -> list[dict[str, Any]]:
    """Parameter groups for :class:`nero_torch.Nero`, one per (neuron axis, constraint), with parameter names.

    Neurons are the rows a layer's output channels read from, so the neuron axis follows the module's weight
    layout: 0 for ``Linear``, ``Bilinear``, ``Conv*d`` and ``Embedding`` (``(out, in, ...)``; an embedding's
    rows are the vectors it emits), 1 for ``ConvTranspose*d`` (``(in, out, ...)``). Biases and the parameters
    of norm layers (``BatchNorm``, ``LayerNorm``, ``GroupNorm``, ``RMSNorm``, ...) are *bias-like*: they have
    no fan-in to balance, so they are updated elementwise at their own scale. Any other parameter with
    ``ndim >= 2`` takes axis 0, torch's ``(out, in)`` convention.

    ``unconstrained`` names modules (``"head"`` also covers ``"head.*"``) whose weights keep Nero's per-neuron
    step but are neither centred nor normalised. Use it for an output layer: unit-norm rows fix the scale of
    the logits, so a classifier could not sharpen its softmax; left free, the head learns its scale (its step
    is then relative to its mean row norm). A tied weight is unconstrained if any module that uses it is.

    ``options`` (``lr``, ``beta``, ...) go into every group.
    """
    free = tuple(unconstrained)
    found: dict[int, tuple[str, Any, int | None, bool]] = {}
    for module_name, module in model.named_modules():
        is_free = any(module_name == f or module_name.startswith(f + ".") for f in free)
        for local, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{local}" if module_name else local
            axis = _neuron_axis(module, local, p.ndim)
            if id(p) in found:  # a shared (tied) parameter: keep its first name and axis
                first_name, _, first_axis, first_free = found[id(p)]
                found[id(p)] = (first_name, p, first_axis, first_free or is_free)
            else:
                found[id(p)] = (name, p, axis, is_free)
    groups: dict[tuple[int | None, bool], dict[str, Any]] = {}
    for name, p, axis, is_free in found.values():
        key = (axis, is_free and axis is not None)
        if key not in groups:
            groups[key] = {"params": [], "neuron_axis": axis, **options}
            if key[1]:
                groups[key].update(centre=False, normalise=False)
        groups[key]["params"].append((name, p))
    return list(groups.values())


def _neuron_axis(module: nn.Module, local_name: str, ndim: int) -> int | None:
    if ndim < 2 or isinstance(module, _NORMS) or "bias" in local_name:
        return None
    if isinstance(module, _AXIS_1):
        return 1
    return 0
