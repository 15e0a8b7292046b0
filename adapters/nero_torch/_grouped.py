"""The default eager step over many tensors at once: the per-row maths once per bucket of tensors, not per tensor.

``Nero(params)`` (``fused`` not True, ``foreach`` not False, outside ``torch.compile``, no DTensor) takes this path
from every tensor's second update on. Tensors are put in buckets by device, dtype, parameter group, constraint and
row length; a bucket of small tensors (up to :data:`SMALL` elements each) is concatenated into one ``(rows, fan_in)``
array (bias-like tensors: one flat array), so that a model of hundreds of small tensors (biases, norm gains, the
layers of a deep narrow network) pays a few dozen torch calls per step, not a few dozen per tensor. Large tensors
are streamed, not copied: each is read through views and written in place (rows a cache-sized block at a time, the
core's :func:`~nero_core._neurons.neuron_sums` and :func:`~nero_core._neurons.affine_write`), and the large weights of
a group that share a dtype and constraint, whatever their row length, share one bucket for the per-row maths (their
row sums concatenated; ``fan_in`` per row), so that a model of many large layers pays that maths once, not once per
layer.

The maths is the core's closed form (:mod:`nero_core._closed_form`): five row sums of the old row, the new ``v`` and
the step per row (:func:`~nero_core._closed_form.step_rate`), the factors
(:func:`~nero_core._closed_form.balance_factors`) and one affine write; a bucket in which a row's closed form
cancels is balanced from its actual rows. Everything is read before anything is written: one host sync per step
decides both whether every new ``v`` is finite (else the step is skipped, or left to the per-tensor path for
``skip_nonfinite="neuron"``) and which buckets need their rows balanced from the arrays.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import array_api_compat.torch as xp
import torch
from torch import Tensor

from nero_core._closed_form import balance_factors, step_rate
from nero_core._neurons import affine_write, balanced_rows, neuron_sums

from ._functional import TensorSpec, compute_dtype

__all__ = ["SMALL", "step"]

# Tensors of at most this many elements are concatenated with the others of their bucket (a copy in, a copy out):
# below it a tensor's own torch calls cost more than moving it; above it the copies cost more than the calls.
SMALL = 1 << 16


class _Member(NamedTuple):
    p: Tensor
    g: Tensor
    state: dict[str, Tensor]
    spec: TensorSpec


class _Bucket:
    """Tensors updated as one: same device, parameter dtype, group and constraint; a concatenated bucket's tensors
    (small ones) also share their row length (``fan_in`` 0 for bias-like tensors, whose rows are their elements),
    a streamed bucket's (large ones) are read and written one at a time and share only the per-row maths."""

    def __init__(self, group: dict[str, Any], members: list[_Member], *, streamed: bool) -> None:
        self.group, self.members, self.streamed = group, members, streamed
        self.w: Tensor | None = None  # a concatenated bucket's rows, from read to write
        self.g: Tensor | None = None
        first = members[0]
        self.dtype = compute_dtype(first.p.dtype)
        self.neurons = first.spec.axis is not None
        self.counts = [m.state["v"].numel() for m in members]  # rows (bias-like: elements) per tensor

    def _rows(self, x: Tensor, spec: TensorSpec) -> Tensor:
        """``x`` as the bucket's rows: ``(neurons, fan_in)``, or flat for bias-like tensors, in the compute dtype."""
        x = x.to(self.dtype)
        if not self.neurons:
            return x.reshape(-1)
        axis = cast(int, spec.axis)
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)

    def _gather(self, which: str) -> Tensor:
        parts = [self._rows(getattr(m, which), m.spec) for m in self.members]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _per_row(self, parts: list[Tensor]) -> Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def read(self) -> None:
        """Every sum and the new ``v`` and step per row; nothing written. A concatenated bucket keeps its rows for
        :meth:`write`; a streamed bucket keeps only its sums (each tensor's rows are gathered again there: where
        they are a copy, bfloat16 to float32 or another neuron axis, holding every large tensor's copy until the
        writes would cost memory the size of the model)."""
        group, members = self.group, self.members
        if self.streamed:
            fan_in: Any = []
            sums = []
            for m in members:  # (one tensor's rows at a time: where they are a copy, one copy at a time)
                w, g = self._rows(m.p, m.spec), self._rows(m.g, m.spec)
                fan_in.append(w.shape[1] if self.neurons else 1)
                sums.append(neuron_sums(w, g, 0, xp) if self.neurons else (g * g,))
            del w, g
            if self.neurons:
                self.sw, self.sww, self.sg, self.sgg, self.swg = (self._per_row([s[k] for s in sums]) for k in range(5))
            else:
                self.sgg = self._per_row([s[0] for s in sums])
        else:
            w, g = self._gather("p"), self._gather("g")
            self.w, self.g = w, g
            fan_in = [w.shape[1] if self.neurons else 1]
            if self.neurons:
                self.sw, self.sww, self.sg, self.sgg, self.swg = neuron_sums(w, g, 0, xp)
            else:
                self.sgg = g * g
        if len(members) == 1:
            state = members[0].state
            v, sigma, count = state["v"].reshape(-1), state["sigma"], state["step"]
        else:
            v = torch.cat([m.state["v"].reshape(-1) for m in members])
            counts = torch.tensor(self.counts, device=v.device)
            sigma = torch.stack([m.state["sigma"] for m in members]).repeat_interleave(counts, output_size=v.numel())
            count = torch.stack([m.state["step"] for m in members]).repeat_interleave(counts, output_size=v.numel())
            if len(set(fan_in)) > 1:  # streamed rows of several lengths: the row length per row
                fan_in = [torch.tensor(fan_in, dtype=v.dtype, device=v.device).repeat_interleave(
                    counts, output_size=v.numel())]
        lr = -group["lr"] if group["maximize"] else group["lr"]
        self.v, self.c = step_rate(self.sgg, v, sigma, count, lr=lr, beta=group["beta"], xp=xp)
        self.recompute = torch.zeros((), dtype=torch.bool, device=v.device)
        if self.neurons:
            spec = members[0].spec
            self.factors = balance_factors(
                self.sw, self.sww, self.sg, self.sgg, self.swg, self.c, fan_in=fan_in[0], centre=spec.centre,
                normalise=spec.normalise, xp=xp,
            )
            self.recompute = self.factors.recompute.any()

    def write(self, recompute: bool) -> None:
        """The new parameters, ``v`` and step counts, in place."""
        members = self.members
        if self.streamed:
            c = self.c.split(self.counts)
            factors = [f.split(self.counts) for f in self.factors[:3]] if self.neurons else None
            for i, m in enumerate(members):
                w, g = self._rows(m.p, m.spec), self._rows(m.g, m.spec)
                rows = self._new_rows(w, g, c[i], None if factors is None else [f[i] for f in factors], recompute)
                if rows.data_ptr() != m.p.data_ptr():  # (w was a copy, or the rows were balanced from a copy)
                    m.p.detach().copy_(self._shaped(rows, m))
        else:
            w, g = cast(Tensor, self.w), cast(Tensor, self.g)
            self.w = self.g = None
            factors = list(self.factors[:3]) if self.neurons else None
            new = self._new_rows(w, g, self.c, factors, recompute)
            if new.data_ptr() != members[0].p.data_ptr():  # (a tensor alone, written in place, is done)
                params = [m.p.detach() for m in members]
                parts = new.split(self.counts)
                torch._foreach_copy_(params, [self._shaped(x, m) for x, m in zip(parts, members)])
        vs = [m.state["v"] for m in members]
        torch._foreach_copy_(vs, [x.view(v.shape) for x, v in zip(self.v.split(self.counts), vs)])
        torch._foreach_add_([m.state["step"] for m in members], 1)

    def _new_rows(self, w: Tensor, g: Tensor, c: Tensor, factors: list[Tensor] | None, recompute: bool) -> Tensor:
        """The new rows from ``w`` (the parameter's own memory, as rows, or a copy of it; written in place where the
        closed form holds) and ``g``."""
        if factors is None:  # bias-like
            return w.addcmul_(c, g, value=-1)
        spec = self.members[0].spec
        if recompute:  # the closed form cancels in some row: balance the actual rows
            return balanced_rows(w - c[:, None] * g, xp, centre=spec.centre, normalise=spec.normalise)
        scale, step, shift = factors
        return affine_write(w, g, scale, step, shift, 0, xp, in_place=True)

    def _shaped(self, rows: Tensor, m: _Member) -> Tensor:
        """A tensor's share of the bucket's rows, in its parameter's shape (a view)."""
        if not self.neurons:
            return rows.view(m.p.shape)
        axis = cast(int, m.spec.axis)
        return rows.view(m.p.movedim(axis, 0).shape).movedim(0, axis)


def buckets(work: list[tuple[dict[str, Any], list[Tensor], list[Tensor], list[TensorSpec]]],
            states: Any) -> list[_Bucket] | None:
    """The step's buckets, or None where this path does not apply to every tensor (a first update, an empty
    tensor, ``fused=True`` or ``foreach=False`` in a group)."""
    out: list[_Bucket] = []
    for group, params, grads, specs in work:
        if not params:
            continue
        if group["fused"] or group["foreach"] is False:
            return None
        small: dict[tuple, list[_Member]] = {}
        large: dict[tuple, list[_Member]] = {}
        for p, g, spec in zip(params, grads, specs):
            state = states.get(p)
            if not state or p.numel() == 0:
                return None
            member = _Member(p, g, state, spec)
            key: tuple = (p.device, p.dtype, g.dtype, spec.axis is None, spec.centre, spec.normalise)
            if p.numel() > SMALL:  # (a large bias-like tensor alone: its per-element g*g is as large as it is)
                large.setdefault((*key, id(p)) if spec.axis is None else key, []).append(member)
                continue
            fan_in = 0 if spec.axis is None else p.numel() // p.shape[spec.axis]
            small.setdefault((*key, fan_in), []).append(member)
        out.extend(_Bucket(group, members, streamed=False) for members in small.values())
        out.extend(_Bucket(group, members, streamed=True) for members in large.values())
    return out


def step(bucket_list: list[_Bucket]) -> tuple[bool, list[bool]]:
    """Read every bucket; return whether every new ``v`` is finite and, per bucket, whether its rows must be
    balanced from the arrays (one host sync). Write nothing."""
    for bucket in bucket_list:
        bucket.read()
    flags = [torch.isfinite(b.v).all() for b in bucket_list] + [b.recompute for b in bucket_list]
    device = bucket_list[0].v.device
    values = torch.stack([f.to(device) for f in flags]).tolist()
    return all(values[:len(bucket_list)]), values[len(bucket_list):]
