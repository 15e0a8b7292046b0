"""Nero on ``DTensor`` parameters (FSDP2's ``fully_shard``, tensor parallelism): each neuron on the rank that holds it.

Nero's state and step are per neuron, so a layer sharded by neurons needs no communication. For a parameter with
neuron axis ``a``, mesh dimension by mesh dimension:

- ``Replicate()`` or ``Shard(a)`` (FSDP2's ``Shard(0)`` of ``Linear``/``Conv``/``Embedding`` weights, a
  column-parallel ``Linear``, uneven and empty shards included): each row is whole on its rank, and the ordinary
  kernels run on the local shard, with no communication.
- ``Shard(d)``, ``d != a`` (a row-parallel ``Linear``'s ``Shard(1)``; FSDP2's ``Shard(0)`` of a ``ConvTranspose``
  weight, whose neurons are on axis 1): rows are split across that mesh dimension, and their sums
  ``|g|^2, sum(g), |w|^2, sum(w), <w, g>`` are all-reduced over it, one all-reduce per step for all such tensors
  together (two more at the first update, for the projection). The rule is the same algebra as the fast path's.
- Bias-like tensors are elementwise: local under any placement. ``Partial`` parameters are refused.

At the first update ``sigma`` (the mean row norm when rows are not normalised, mean ``|p|`` for bias-like tensors)
sums over the whole tensor: one all-reduce per mesh at that step, for every tensor at once.

Non-finite gradients: every step, the ranks agree on whether any of them saw a non-finite gradient (or a square past
the state's dtype), and all take the step or all skip it, so replicas (``Replicate`` placements, plain tensors beside
DTensors), step counts and ``skipped_steps`` stay identical on every rank. The verdict is one scalar all-reduce per
mesh and step: it rides on the step's last all-reduce where that one spans the whole mesh (the first step's
``sigma``; row sums split over every rank of a 1-D mesh), else it goes alone, as plain c10d (cheaper for a scalar
than DTensor's redistribution). ``skip_nonfinite="neuron"`` skips the whole step here too.

State: ``v`` is a DTensor laid out like the neurons (so distributed checkpoints save it whole); ``step`` and
``sigma`` are plain 0-d tensors, equal on every rank. Sharded parameters always take the eager kernels
(``fused`` applies to plain tensors).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nero_core._closed_form import start_sigma

from ._functional import (
    StepSizes, TensorSpec, _per_row, _row_terms, apply_step, compute_dtype, sizes_from_sums, squared_norms, step_sizes,
)

__all__ = ["ShardedStep", "check_param", "is_dtensor", "split_off"]


def is_dtensor(x: Any) -> bool:
    # No DTensor can exist before torch.distributed.tensor is imported: plain runs never import it.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


@dataclass(frozen=True)
class Layout:
    """Where a parameter's neurons live on its device mesh."""

    mesh: Any
    split: tuple[int, ...]  # mesh dims that split rows across ranks: row sums are all-reduced over these
    rows: tuple[int, ...]  # mesh dims that shard the neurons (bias-like: every sharded dim): sigma's sums
    state: tuple[Any, ...]  # placements of ``v``


def layout(p: Any, axis: int | None, name: str) -> Layout:
    """The layout of DTensor ``p`` whose (normalised) neuron axis is ``axis``, or a ValueError naming it."""
    from torch.distributed.tensor import Replicate, Shard

    try:  # FSDP2 with tensor parallelism shards the same axis twice, right to left
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover - older torch
        _StridedShard = Shard

    split, rows, state = [], [], []
    for dim, placement in enumerate(p.placements):
        if placement.is_replicate():
            state.append(Replicate())
            continue
        if not isinstance(placement, (Shard, _StridedShard)):
            raise ValueError(
                f"Nero cannot update {name} with placements {tuple(p.placements)}: every mesh dimension must be "
                f"Shard or Replicate ({placement} is not; a Partial parameter is a reduction still to be done)"
            )
        if axis is not None and placement.dim % p.ndim != axis:
            split.append(dim)
            state.append(Replicate())
            continue
        rows.append(dim)
        if axis is None:
            state.append(placement)
        elif isinstance(placement, _StridedShard):
            state.append(_StridedShard(0, split_factor=placement.split_factor))
        else:
            state.append(Shard(0))
    return Layout(p.device_mesh, tuple(split), tuple(rows), tuple(state))


def check_param(p: Any, spec: TensorSpec, name: str) -> None:
    """Refuse, by name, a DTensor parameter whose placements Nero cannot update (nothing for plain tensors)."""
    if is_dtensor(p):
        layout(p, spec.axis, name)


def _all_reduce(pieces: list[tuple[Any, tuple[int, ...], Tensor]]) -> list[Tensor]:
    """Sum each ``x`` of ``(mesh, dims, x)`` over the ranks along those mesh dims: one all-reduce per
    ``(mesh, dims)`` (in the widest dtype among its pieces), in the order of first appearance, the same on every
    rank. It goes through DTensor (``Partial`` to ``Replicate``), so ``CommDebugMode`` counts it."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    out: list[Tensor] = [x for _, _, x in pieces]
    groups: dict[tuple[Any, tuple[int, ...]], list[int]] = {}
    for i, (mesh, dims, _) in enumerate(pieces):
        if dims:
            groups.setdefault((mesh, dims), []).append(i)
    for (mesh, dims), index in groups.items():
        flat = torch.cat([pieces[i][2].reshape(-1) for i in index])  # promotes float32 to float64 where mixed
        partial = [Partial() if d in dims else Replicate() for d in range(mesh.ndim)]
        total = DTensor.from_local(flat, mesh, partial, run_check=False).redistribute(mesh, [Replicate()] * mesh.ndim)
        for i, part in zip(index, total.to_local().split([pieces[i][2].numel() for i in index])):
            out[i] = part.reshape(pieces[i][2].shape).to(pieces[i][2].dtype)
    return out


def _row_sum(x: Tensor, axis: int) -> Tensor:
    """Sums over every axis but the neuron axis: one value per local row."""
    return x.sum([d for d in range(x.ndim) if d != axis])


@dataclass
class _Item:
    """One DTensor parameter in this step, with its local shard and what phase one found for it."""

    p: Any
    local: Tensor  # the parameter's local shard (written in place)
    grad: Tensor  # the gradient's local shard, laid out like the parameter's
    spec: TensorSpec
    layout: Layout
    hyper: dict[str, Any]
    state: dict[str, Tensor] | None  # None before the first update
    w: Tensor | None = None  # first update of a neuron tensor: the projected weights (compute dtype)
    row_norms: Tensor | None = None  # first update, not normalised: the norm of every local row
    sigma: Tensor | None = None
    sizes: StepSizes | None = None
    terms: tuple[Tensor, Tensor, Tensor] | None = None  # split rows: per-row (c, mean, scale)

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.local.dtype)

    @property
    def split(self) -> bool:
        return self.spec.axis is not None and bool(self.layout.split)

    @property
    def empty_rows(self) -> bool:  # a neuron tensor with no local row: the kernels have nothing to do
        return self.spec.axis is not None and self.local.shape[self.spec.axis] == 0

    def local_state(self) -> dict[str, Tensor]:
        """The state as local tensors (the step reads and writes these); a whole ``v`` is sharded on the way."""
        if self.state is None:  # first update: a scratch state that nothing keeps if the step is skipped
            shape = self.local.shape if self.spec.axis is None else (self.local.shape[self.spec.axis],)
            return {
                "step": torch.zeros((), dtype=torch.float32, device=self.local.device),
                "v": torch.zeros(shape, dtype=self.dtype, device=self.local.device),
                "sigma": self.sigma,
            }
        if not is_dtensor(self.state["v"]):  # e.g. loaded from an unsharded run
            from torch.distributed.tensor import distribute_tensor

            v = self.state["v"]
            self.state["v"] = distribute_tensor(v, self.layout.mesh, self.layout.state, src_data_rank=None)
        return {"step": self.state["step"], "v": self.state["v"].to_local(), "sigma": self.state["sigma"]}

    def new_state(self) -> dict[str, Tensor]:
        from torch.distributed.tensor import DTensor

        scratch = self.local_state()
        shape = tuple(self.p.shape) if self.spec.axis is None else (self.p.shape[self.spec.axis],)
        stride = tuple(torch.empty(shape, device="meta").stride())
        v = DTensor.from_local(scratch["v"], self.layout.mesh, self.layout.state, run_check=False, shape=shape,
                               stride=stride)
        return {"step": scratch["step"], "v": v, "sigma": self.sigma.clone()}


class ShardedStep:
    """Nero's step on the DTensor parameters of one ``Nero.step``: :meth:`prepare` does every collective (on
    every rank, whatever its gradients hold), :meth:`apply` only local writes, once the step is known taken."""

    def __init__(self, items: list[_Item]) -> None:
        self.items = items

    def prepare(self, checks: list[Tensor]) -> list[Tensor]:
        """Phase one; ``checks`` are the plain parameters' non-finite checks. Returns checks to join them, finite
        exactly when no rank saw a non-finite gradient (or a square past the state's dtype): the same verdict on every
        rank of every mesh, so that all ranks take the step or all skip it (replicas never diverge). The verdict is
        one scalar per mesh, all-reduced with the step's last collective where that one spans the mesh, else alone."""
        first = [it for it in self.items if it.state is None]
        split = [it for it in self.items if it.split]
        for it in self.items:
            if it.state is not None and not it.split and not it.empty_rows:
                it.sizes = step_sizes(it.grad, it.local_state(), it.spec, **it.hyper)
        local = checks + [it.sizes.v if it.sizes is not None else _squares(it) for it in self.items]
        agreed, reduced = None, []
        if first:
            self._project([it for it in first if it.spec.axis is not None])
            agreed = self._sigmas(first, None if split else local)  # the last collective when no row is split
            for it in first:
                if not it.split and not it.empty_rows:
                    it.sizes = step_sizes(it.grad, it.local_state(), it.spec, **it.hyper)
        if split:
            meshes = {it.layout.mesh for it in self.items}
            spans = len(meshes) == 1 and all(it.layout.split == tuple(range(it.layout.mesh.ndim)) for it in split)
            # rows split over every rank: all ranks hold the same reduced sums, so the verdict may ride along
            agreed, reduced = self._split_sizes(split, local if spans else None)
            local += reduced
        if agreed is None:
            agreed = self._agree_alone(local)
        return [agreed, *reduced]

    def apply(self, states: dict[Any, dict[str, Tensor]]) -> None:
        """Phase two: write parameters and state (the step is taken)."""
        for it in self.items:
            if it.state is None:
                fresh = it.new_state()
                it.state = states[it.p]
                it.state.update(fresh)
            state = it.local_state()
            target = it.w if it.w is not None else it.local
            if it.split:
                _write_split(it, target, state)
            elif it.empty_rows:
                state["step"].add_(1)
            else:
                apply_step(target, it.grad, state, it.spec, it.sizes)
            if target is not it.local:
                it.local.copy_(target)

    # ---- the collectives of phase one -------------------------------------------------------------------

    def _project(self, first: list[_Item]) -> None:
        """The first update's projection of neuron tensors into scratch weights ``it.w`` (two all-reduces when
        rows are split), and the row norms that sigma needs when rows are not normalised."""
        for it in first:
            it.w = it.local.to(it.dtype, copy=True)
        centred = [it for it in first if it.spec.centre]
        sums = _all_reduce([(it.layout.mesh, it.layout.split, _row_sum(it.w, it.spec.axis)) for it in centred])
        for it, s in zip(centred, sums):
            it.w -= _per_row(s / _fan_in(it), it.w, it.spec.axis)
        squares = _all_reduce([(it.layout.mesh, it.layout.split, _row_sum(it.w * it.w, it.spec.axis)) for it in first])
        for it, sq in zip(first, squares):
            norms = sq.sqrt()
            if it.spec.normalise:
                positive = norms > 0
                it.w *= _per_row(torch.where(positive, 1 / torch.where(positive, norms, 1.0), 1.0), it.w, it.spec.axis)
            else:
                it.row_norms = norms

    def _sigmas(self, first: list[_Item], local: list[Tensor] | None) -> Tensor | None:
        """Every first-updated tensor's sigma, one all-reduce per mesh, carrying the verdict on ``local`` checks
        where given (see :meth:`_agree`; returns it, else None)."""
        pieces, owners = [], []
        for it in first:
            if it.spec.axis is not None and it.spec.normalise:
                it.sigma = torch.ones((), dtype=it.dtype, device=it.local.device)
                continue
            local_sum = it.row_norms.sum() if it.spec.axis is not None else it.local.to(it.dtype).abs().sum()
            pieces.append((it.layout.mesh, it.layout.rows, local_sum))
            owners.append(it)
        agreed, reduced = self._agree(local, pieces) if local is not None else (None, _all_reduce(pieces))
        for it, total in zip(owners, reduced):
            count = it.p.shape[it.spec.axis] if it.spec.axis is not None else it.p.numel()
            mean = total / count
            it.sigma = start_sigma(mean, neuron=it.spec.axis is not None, xp=torch)  # the core's floors where 0
        return agreed

    def _agree(self, local: list[Tensor], pieces: list[tuple[Any, tuple[int, ...], Tensor]]) -> tuple[Tensor, list]:
        """All-reduce ``pieces`` together with whether any of the ``local`` checks is not finite, over every rank of
        each mesh. Returns the agreed check (NaN when some rank saw a non-finite value, else 0) and the reduced
        pieces."""
        nonfinite = _any_nonfinite(local)
        meshes = list(dict.fromkeys(it.layout.mesh for it in self.items))
        flags = [(mesh, tuple(range(mesh.ndim)), nonfinite.to(_device(self.items, mesh))) for mesh in meshes]
        reduced = _all_reduce(pieces + flags)
        agreed = torch.stack([f.to(nonfinite.device) for f in reduced[len(pieces):]]).sum()
        return torch.where(agreed > 0, torch.nan, 0.0), reduced[:len(pieces)]

    def _agree_alone(self, local: list[Tensor]) -> Tensor:
        """:meth:`_agree` with nothing to carry: one c10d all-reduce of the flag per mesh (a 1-D mesh, or one that
        spans the world; else one per mesh dimension), each mesh summing what the one before it found. Plain c10d,
        as a scalar through DTensor's redistribution costs several times more."""
        import torch.distributed as dist

        count = _any_nonfinite(local)
        for mesh in dict.fromkeys(it.layout.mesh for it in self.items):
            whole = mesh.ndim == 1 or mesh.size() == dist.get_world_size()
            groups = [mesh.get_group() if mesh.ndim == 1 else dist.group.WORLD] if whole else [
                mesh.get_group(d) for d in range(mesh.ndim)]
            count = count.to(_device(self.items, mesh))
            for group in groups:
                dist.all_reduce(count, group=group)
        return torch.where(count > 0, torch.nan, 0.0)

    def _split_sizes(self, split: list[_Item], local: list[Tensor] | None) -> tuple[Tensor | None, list[Tensor]]:
        """Step sizes and per-row terms of tensors whose rows span ranks: their five row sums in one all-reduce,
        carrying the verdict on ``local`` checks where given. Returns it (else None) and the new ``v`` of each, the
        same on every rank of its rows."""
        pieces = []
        for it in split:
            w = it.w if it.w is not None else it.local.to(it.dtype)
            g = it.grad.to(it.dtype)
            sums = [g * g, g, w * w, w, w * g]
            pieces.append((it.layout.mesh, it.layout.split, torch.stack([_row_sum(x, it.spec.axis) for x in sums])))
        agreed, reduced = self._agree(local, pieces) if local is not None else (None, _all_reduce(pieces))
        checks = []
        for it, (gg, sg, ww, sw, wg) in zip(split, reduced):
            it.sizes = sizes_from_sums(gg, sg, it.local_state(), rows=True, **it.hyper)
            rows = sg.shape[0]
            if rows:
                it.terms = _row_terms(ww, sw, wg, it.sizes, it.spec, _fan_in(it) * rows)
            checks.append(it.sizes.v)
        return agreed, checks


def _write_split(it: _Item, target: Tensor, state: dict[str, Tensor]) -> None:
    if it.terms is not None:
        c, mean, scale = (_per_row(x, target, it.spec.axis) for x in it.terms)
        target.copy_((target.to(it.dtype) - c * it.grad.to(it.dtype) - mean) * scale)
    state["v"].copy_(it.sizes.v)
    state["step"].add_(1)


def _squares(it: _Item) -> Tensor:
    """The local non-finite check of a gradient without step sizes (as the optimizer's: its squares)."""
    return squared_norms(it.grad, it.spec) if it.grad.numel() else it.grad


def _fan_in(it: _Item) -> int:
    return it.p.numel() // it.p.shape[it.spec.axis]


def _device(items: list[_Item], mesh: Any) -> torch.device:
    return next(it.local.device for it in items if it.layout.mesh == mesh)


def _any_nonfinite(checks: list[Tensor]) -> Tensor:
    device = checks[0].device
    finite = torch.stack([torch.isfinite(c).all().to(device) for c in checks]).all()
    return (~finite).to(torch.float32)


def split_off(work: list[tuple], states: dict[Any, Any]) -> tuple[list[tuple], ShardedStep | None]:
    """Take the DTensor parameters out of ``work`` (``(group, params, grads, specs)`` per group) into a
    :class:`ShardedStep`; without any, ``work`` comes back as it was."""
    if not any(is_dtensor(p) for _, params, _, _ in work for p in params):
        return work, None
    kept, items = [], []
    for group, params, grads, specs in work:
        hyper = dict(lr=group["lr"], beta=group["beta"], maximize=group["maximize"])
        plain = [i for i, p in enumerate(params) if not is_dtensor(p)]
        for p, g, spec in zip(params, grads, specs):
            if is_dtensor(p):
                items.append(_item(p, g, spec, hyper, states.get(p)))
        if plain:
            kept.append((group, [params[i] for i in plain], [grads[i] for i in plain], [specs[i] for i in plain]))
    return kept, ShardedStep(items)


def _item(p: Any, grad: Any, spec: TensorSpec, hyper: dict[str, Any], state: dict[str, Tensor] | None) -> _Item:
    name = f"a parameter of shape {tuple(p.shape)} with placements {tuple(p.placements)}"
    if not is_dtensor(grad):
        raise TypeError(f"{name} has a plain-tensor gradient: a DTensor parameter needs a DTensor gradient")
    if grad.device_mesh != p.device_mesh or tuple(grad.placements) != tuple(p.placements):
        grad = grad.redistribute(p.device_mesh, p.placements)  # e.g. a Partial gradient: the reduction it needs
    return _Item(p, p.to_local(), grad.to_local(), spec, layout(p, spec.axis, name), hyper, state or None)
