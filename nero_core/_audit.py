"""The role audit: what Nero does with each parameter tensor, and the settings that look like mistakes.

Nero needs one decision per tensor, which axis holds its neurons and whether they are constrained, and a wrong
one trains quietly worse. Each tensor gets a :class:`Role` row (name, shape, role, neuron axis, neuron count,
fan-in, and why); :func:`suspicions` names what in a row looks like a mistake. The adapters supply the names and
the reasons (module types, framework conventions) and add the fix in their own terms.
"""

from __future__ import annotations

import math
import os
import re
import sys
import warnings
from dataclasses import dataclass
from types import FrameType

from ._neurons import neuron_axis_of

__all__ = ["ConfigWarning", "Role", "format_roles", "positions_axis", "role_of", "suspicions", "warn_from_user_code",
           "warning_text"]

NEURON, BIAS_LIKE, UNCONSTRAINED = "neuron tensor", "bias-like", "unconstrained"
KERNEL_SIZES = 7  # the longest axis taken for a convolution's kernel size (1, 3, 5 and 7 are the usual ones)


class ConfigWarning(UserWarning):
    """A parameter's role under Nero looks like a mistake; the message names the tensor and the fix."""


@dataclass(frozen=True)
class Role:
    """What Nero does with one tensor. ``neurons`` and ``fan_in`` are None for a bias-like tensor."""

    name: str
    shape: tuple[int, ...]
    role: str
    neuron_axis: int | None
    neurons: int | None
    fan_in: int | None
    why: str


def role_of(name: str, shape: tuple[int, ...], axis: int | None, *, constrained: bool, why: str) -> Role:
    """The role of a tensor of ``shape`` given its neuron ``axis`` setting (``why`` says where that came from);
    ``constrained``: whether its neurons are centred or normalised."""
    shape = tuple(int(n) for n in shape)
    resolved = neuron_axis_of(shape, axis)
    if resolved is None:
        if axis is not None:  # the core's rule overrides the setting
            why = "ndim < 2" if len(shape) < 2 else "fan-in 1: one input per neuron, nothing to balance"
        return Role(name, shape, BIAS_LIKE, None, None, None, why)
    neurons = shape[resolved]
    return Role(
        name, shape, NEURON if constrained else UNCONSTRAINED, resolved, neurons,
        math.prod(shape) // neurons if neurons else 0, why,
    )


def format_roles(rows: list[Role]) -> str:
    """The rows as an aligned text table."""
    header = ("name", "shape", "role", "axis", "neurons", "fan-in", "why")
    cells = [header] + [
        (r.name, str(r.shape), r.role, _dash(r.neuron_axis), _dash(r.neurons), _dash(r.fan_in), r.why) for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in cells)


def _dash(x: int | None) -> str:
    return "-" if x is None else str(x)


_POSITIONAL = re.compile(r"(^|_)pos(ition(al)?)?(_|$)|pos_?emb|pos_?enc|positional")


def positions_axis(shape: tuple[int, ...]) -> int:
    """The first axis longer than 1: a positional embedding's positions (``(1, T, d)``: 1)."""
    return next((i for i, n in enumerate(shape) if n > 1), 0)


def suspicions(row: Role, own_name: str) -> dict[str, str]:
    """What looks like a mistake in ``row``, by kind, each with the reason (no fix: the adapters add theirs).
    ``own_name`` is the tensor's own name, the last part of its path (``"bias"`` for ``"attn.q.bias"``).

    Kinds, the most specific first: ``positional`` (named like a positional embedding, with its neurons on
    another axis than its first axis longer than 1, the positions), ``bias`` (a neuron tensor named like a bias),
    ``kernel_axis`` (the neuron axis of a convolution kernel is as short as a kernel size, where a channel axis is
    longer), ``one_neuron`` (a constrained tensor with one neuron: its whole scale is fixed).
    """
    if row.neuron_axis is None:
        return {}
    found, last = {}, own_name.lower()
    positions = positions_axis(row.shape)
    if _POSITIONAL.search(last) and row.neuron_axis != positions:
        found["positional"] = (
            f"is named like a positional embedding, but its neurons are on axis {row.neuron_axis} rather than its "
            f"positions (axis {positions}, one vector per position, as an embedding table's rows)"
        )
    if "bias" in last:
        found["bias"] = "is named like a bias but is a neuron tensor, whose neurons Nero balances"
    if _kernel_like(row.shape, row.neuron_axis):
        found["kernel_axis"] = (
            f"has its neurons on axis {row.neuron_axis}, of length {row.neurons}, which looks like a convolution's "
            "kernel size: its output channels are probably on another axis"
        )
    if row.role == NEURON and row.neurons == 1:
        found["one_neuron"] = (
            "has one neuron: Nero keeps it one balanced unit vector, which fixes the scale of the whole tensor"
        )
    return found


def _kernel_like(shape: tuple[int, ...], axis: int) -> bool:
    """Whether ``axis`` of a convolution kernel (ndim >= 4) is a kernel axis, in the torch layout
    ``(out, in, *kernel)`` or the Flax one ``(*kernel, in, out)``, with a longer channel axis beside."""
    ndim, n = len(shape), shape[axis]
    if ndim < 4 or n > KERNEL_SIZES:
        return False
    torch_kernel = axis >= 2 and max(shape[2:]) <= KERNEL_SIZES and max(shape[:2]) > n
    flax_kernel = axis <= ndim - 3 and max(shape[:-2]) <= KERNEL_SIZES and max(shape[-2:]) > n
    return torch_kernel or flax_kernel


def warning_text(row: Role, found: dict[str, str], fix: str) -> str:
    """One warning for a tensor: every reason found, then the fix for the first (the most specific)."""
    return f"Nero: parameter {row.name} of shape {row.shape} " + "; it ".join(found.values()) + f". Fix: {fix}"


def warn_from_user_code(message: str, packages: tuple[str, ...]) -> None:
    """A :class:`ConfigWarning` shown at the user's line: the first frame outside the named (imported) packages
    and nero_core, so that Python's default filter shows it once per line and tensor."""
    files = [getattr(sys.modules.get(name), "__file__", None) for name in (*packages, __name__.split(".")[0])]
    here = tuple(os.path.dirname(file) + os.sep for file in files if file)
    frame: FrameType | None = sys._getframe(1)
    level = 2  # stacklevel 2 is the frame that called this one
    while frame is not None and frame.f_code.co_filename.startswith(here):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, ConfigWarning, stacklevel=level)
