"""``nero_torch.Nero``: the core Nero rule as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from nero_core._kernels import Unavailable, warn_unavailable
from nero_core._nero import skip_mode
from nero_core._neurons import neuron_axis_of

from . import _dtensor, _grouped, _native
from ._describe import warn_suspicious
from ._functional import (
    StepSizes, TensorSpec, _per_row, apply_step, compute_dtype, reference_update, squared_norms, step_sizes,
)
from ._groups import named_like

__all__ = ["Nero"]


class Nero(torch.optim.Optimizer):
    r"""Nero, the neuronal rotator (Liu, Bernstein, Meister & Yue, *Learning by Turning*, ICML 2021).

    A *neuron tensor* (``ndim >= 2``, fan-in ``>= 2``) is viewed as rows ``W`` of shape ``(neurons, fan_in)``,
    the neuron axis (``neuron_axis``, 0 for ``Linear``/``Conv``/``Embedding``, 1 for ``ConvTranspose``) first.
    Every other tensor (biases, norm gains, fan-in 1) is *bias-like* and updated elementwise.

    .. math::
        \begin{aligned}
        &\textbf{first update of a tensor } (t = 0)\text{:}\\
        &\quad W \leftarrow W - \operatorname{mean}_\text{row}(W) \;\;(\text{centre}),\qquad
              W \leftarrow W / \lVert W \rVert_\text{row} \;\;(\text{normalise; a zero row stays zero})\\
        &\quad \sigma \leftarrow 1 \text{ if normalise, else the mean row norm (bias-like: mean } |p|),
              \text{ or, where that is } 0, 1 \text{ (bias-like: } 0.01)\\
        &\textbf{every update:}\quad t \leftarrow t + 1,\qquad
              v \leftarrow \beta v + (1-\beta)\,\lVert g \rVert_\text{row}^2 \;\;(\text{bias-like: } g^2)\\
        &\quad p \leftarrow p - \text{lr}\cdot\sigma\cdot g \,/\, \sqrt{v / (1 - \beta^t)}
              \quad (\text{no change where } v = 0)\\
        &\quad \text{then centre and normalise the rows of neuron tensors again (as switched on).}
        \end{aligned}

    Every balanced neuron turns through an angle of about ``lr`` radians per step, whatever the layer, so one
    ``lr`` serves every layer; the default 0.01 is a starting point, not a tuned value (in the project's Table 1
    the best lr ran from 0.0316 to 0.316 across five tasks; ``docs/studies.md``). State: one float per neuron (one
    per element of bias-like tensors) and a scale per tensor, against Adam's two floats per weight. There is no
    momentum, weight decay or epsilon.

    Args:
        params: parameters or parameter groups; a group may set ``lr``, ``beta``, ``centre``, ``normalise``
            and ``neuron_axis``. :func:`nero_torch.param_groups` builds groups with the right neuron axis per
            module type.
        lr: step size, a float or a 1-element tensor of any shape (``[]``, ``[1]``, ``[1, 1]``; a tensor avoids
            recompiles under ``torch.compile``). A tensor is read where it lies, once per step: a CPU tensor acts as a
            scalar for parameters on any device; one on another accelerator is copied to theirs. Under CUDA graphs
            keep it on the parameters' device (a CPU value would be captured as a constant).
        beta: decay of the per-neuron second moment, in ``[0, 1)``.
        centre: keep every neuron's weights zero-mean.
        normalise: keep every neuron's weights unit-norm.
        neuron_axis: the axis of neuron tensors that indexes neurons (an int), or None for all bias-like.
        maximize: ascend the objective instead.
        foreach: None or True: the fast path (exact algebra, see ``_functional``): eagerly, torch's kernels run
            once per bucket of tensors (device, dtype, group, constraint, row length; see ``_grouped``), not once
            per tensor; False: call the array-API core rule ``nero_core.nero`` on the tensors (the reference,
            slower).
        fused: None (default): on CPU, the C kernel below where it builds and fits (with ``foreach=None``; no
            warning where it does not: torch's kernels run instead), elsewhere torch's kernels. False: torch's
            kernels. True: the fastest kernels, with a warning where they cannot be built. On CPU (eager,
            float32/float64, contiguous parameters with their neurons on axis 0, as ``Linear``, ``Conv*d`` and
            ``Embedding`` have them) a C kernel does the whole step,
            reading and writing each row while it is in cache (after a first pass reading the gradients, unless
            ``skip_nonfinite="neuron"``), with torch's thread count (built with the system's C compiler on first
            use, about a second, then cached; without one, the build the wheel carries for x86-64 Linux with AVX2;
            see ``nero_torch._native``). On CUDA (the same layouts; float16 and
            bfloat16 too) Triton kernels do it, a few launches for the whole model and no host sync, each row read
            once and written once (see ``nero_torch._triton``; their GPU speed is not measured yet). Elsewhere
            (under ``torch.compile``, other layouts) the fast path of neuron tensors runs as ``torch.compile``'d
            kernels: compilation on the first steady-state step, once per tensor rank, dtype and device (sizes are
            dynamic), 17 s single-threaded for a GPT-2-like model on a 2-core CPU. Not with ``foreach=True``.
        skip_nonfinite: True or ``"step"``: a step in which any gradient holds NaN or Inf is skipped whole (see
            below); the C kernel then reads the gradients twice, once to check them all before anything is
            written. ``"neuron"``: only the neurons (rows; elements of bias-like tensors) whose gradient is not
            finite keep their weights and ``v``, the rest update, and the C kernel makes one pass over memory,
            as SGD does. Under ``torch.compile`` and for DTensor parameters, ``"neuron"`` skips the whole step.

    DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism) are updated on their local shards; where each
    neuron's row lies on one rank the only communication is one scalar all-reduce per step, the ranks' agreement on
    skipping it (see ``nero_torch._dtensor`` for the other layouts).

    Non-finite gradients: when any gradient of any group holds NaN or Inf, the whole step is skipped (parameters and
    state, step counts included, unchanged; with ``skip_nonfinite="neuron"``, only the neurons concerned) and
    :attr:`skipped_steps` counts it; the count is saved in the state dict. With DTensor parameters every rank skips
    when any rank saw one, so replicas and counts never diverge. Each parameter keeps its own step count;
    a parameter without a gradient is skipped and keeps its state. State is float32 for bf16/fp16 parameters, also
    after ``load_state_dict``. With ``OneCycleLR`` pass ``cycle_momentum=False``: Nero has no momentum to cycle.
    """

    _skip_mode: str | None = "step"  # for an optimizer pickled before skip_nonfinite existed

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 0.01,
        beta: float = 0.999,
        *,
        centre: bool = True,
        normalise: bool = True,
        neuron_axis: int | None = 0,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        skip_nonfinite: bool | str = True,
    ) -> None:
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if skip_nonfinite is False:
            raise ValueError("Nero(skip_nonfinite=False) is not offered: a step never writes NaN or Inf; "
                             "skip_nonfinite='neuron' holds back only the neurons concerned, in one pass")
        self._skip_mode = skip_mode(skip_nonfinite)
        defaults = dict(
            lr=lr, beta=beta, centre=centre, normalise=normalise, neuron_axis=neuron_axis,
            maximize=maximize, foreach=foreach, fused=fused,
        )
        _check_hyperparameters(defaults)
        super().__init__(params, defaults)
        self._skipped = torch.zeros((), dtype=torch.int64)

    # ---- construction-time checks -------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (as torch's optimizers do); one from :func:`nero_torch.param_groups` fits an optimizer
        built on plain parameters too (its names are then dropped). Warns about roles that look like mistakes."""
        super().add_param_group(named_like(self.param_groups, param_group))
        torch.compiler.assume_constant_result(neuron_axis_of)  # here, not at import: see _neuron_axis
        group = self.param_groups[-1]
        offset = sum(len(g["params"]) for g in self.param_groups[:-1])
        try:
            _check_hyperparameters(group)
            for i, p in enumerate(group["params"]):
                _check_param(p, group, _name(group, i, p, offset + i))
                _dtensor.check_param(p, _spec(p, group), _name(group, i, p, offset + i))
        except Exception:
            self.param_groups.pop()
            raise
        warn_suspicious(group, offset)

    # ---- state --------------------------------------------------------------------------------------------

    @property
    def skipped_steps(self) -> int:
        """How many steps a gradient was not finite in: skipped whole, or with ``skip_nonfinite="neuron"`` held
        back for the neurons concerned (saved in the state dict)."""
        return int(self._skipped)

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        state_dict["skipped_steps"] = self._skipped.clone()
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load through torch's own loading (its pre-hooks, then its post-hooks, whose edits stay), after checking
        the dict the pre-hooks leave: the groups must be Nero's and every parameter's state must have its shape, a
        real floating dtype and finite values; on any error nothing changes.

        ``v`` and ``sigma`` are cast to the compute dtype (float32 for bf16/fp16/fp32 parameters, float64 for fp64),
        as torch casts optimizer state to its parameter, so a checkpoint moves between precisions. A group saved
        without ``maximize``, ``foreach`` or ``fused`` gets their defaults, as torch's optimizers fill them.
        """
        # Registered last, so that it checks what the user's pre-hooks leave; torch's loading then goes on.
        handle = self.register_load_state_dict_pre_hook(self._check_loading)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
            self.__dict__.pop("_checked", None)

    def _check_loading(self, _optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        """``load_state_dict``'s last pre-hook: check ``state_dict`` as torch will load it (saved ids in group order
        to this optimizer's parameters) and keep the checked state in the compute dtype and the count of skipped
        steps for ``__setstate__``; raise before anything changes."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for j, saved in enumerate(saved_groups):  # another optimizer's groups, even where it has no state yet
            missing = _NERO_OPTIONS - set(saved)
            if missing:
                raise ValueError(
                    f"loaded state dict is not Nero's: its parameter group {j} lacks {sorted(missing)} "
                    "(a state dict of another optimizer?)"
                )
        kept, index = {}, 0
        for group, saved in zip(self.param_groups, saved_groups):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
                )
            merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}  # what will be in force
            _check_hyperparameters(merged)
            for i, (p, key) in enumerate(zip(group["params"], saved["params"])):
                name = _name(merged, i, p, index + i)
                _check_param(p, merged, name)
                if state_dict["state"].get(key):
                    kept[p] = _checked_state(p, state_dict["state"][key], _spec(p, merged), name)
            index += len(group["params"])
        self._checked = (kept, _skipped_count(state_dict.get("skipped_steps", 0)))

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_skipped": self._skipped, "_skip_mode": self._skip_mode}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for group in state["param_groups"]:  # saved before these options existed
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
        checked = self.__dict__.pop("_checked", None)
        if checked is not None:  # from load_state_dict: the checked state replaces torch's cast to the parameter dtype
            kept, self._skipped = checked
            state["state"].update(kept)
        super().__setstate__(state)
        if "_skipped" not in self.__dict__:  # unpickled from before the count was pickled
            self._skipped = torch.zeros((), dtype=torch.int64)

    # ---- the step -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        offsets = [0]
        for group in self.param_groups:
            offsets.append(offsets[-1] + len(group["params"]))
        work = [self._gather(group, offset) for group, offset in zip(self.param_groups, offsets)]
        work, sharded = _dtensor.split_off(work, self.state)  # DTensor parameters (FSDP2, tensor parallel)
        if not any(params for _, params, _, _ in work) and sharded is None:
            return loss
        if sharded is None and (self._triton_step(work) or self._native_step(work)):
            return loss
        grouped = None if sharded is not None or torch.compiler.is_compiling() else _grouped.buckets(work, self.state)
        if grouped:  # the default eager path, from every tensor's second update on: a few calls per bucket
            taken, recompute = _grouped.step(grouped)
            if taken:
                for bucket, balance in zip(grouped, recompute):
                    bucket.write(balance)
                return loss
            if self._skip_mode != "neuron":
                self._skipped += 1
                return loss
            # skip_nonfinite="neuron": the per-tensor path below holds back only the neurons concerned
        # Phase one: per-row step sizes from the gradients of initialised tensors on the fast path; the
        # finiteness of every gradient (all groups) is known before anything is written.
        sizes = [self._step_sizes(*w) for w in work]
        checks = [  # the new v: NaN or Inf in a gradient reaches it, and so does a square past the state's dtype
            s.v if s is not None else squared_norms(g, spec)
            for (_, _, grads, specs), ss in zip(work, sizes) for g, spec, s in zip(grads, specs, ss)
        ]
        if sharded is not None:
            checks += sharded.prepare(checks)  # every collective happens here, on every rank
        finite = _all_finite(checks)
        by_core = sharded is not None or any(s is None for ss in sizes for s in ss)
        held = []
        if by_core or not torch.compiler.is_compiling():
            if not bool(finite):  # a host sync: once per step in eager mode; branch-free under torch.compile
                self._skipped += 1
                if self._skip_mode != "neuron" or sharded is not None:
                    return loss
                held = self._held_neurons(work, checks)
            finite = None  # type: ignore[assignment]  # checked: the kernels skip the check
        else:
            self._skipped.add_((~finite).to(self._skipped.device, torch.int64))
        for (group, params, grads, specs), ss in zip(work, sizes):
            self._apply(group, params, grads, specs, ss, finite)
        if sharded is not None:
            sharded.apply(self.state)
        for p, spec, ok, old_p, old_v in held:  # rows are independent: put back the ones whose v is not finite
            w = p.detach()
            w.copy_(torch.where(ok if spec.axis is None else _per_row(ok, w, spec.axis), w, old_p))
            v = self.state[p]["v"]
            v.copy_(torch.where(ok, v, old_v if old_v is not None else torch.zeros_like(v)))
        return loss

    def _held_neurons(self, work, checks) -> list[tuple[Tensor, TensorSpec, Tensor, Tensor, Tensor | None]]:
        """The tensors with a neuron whose new ``v`` is not finite: which rows are fine, and copies to restore
        the others from (a rare step, worth a copy of those tensors only)."""
        held, checks = [], iter(checks)
        for _, params, _, specs in work:
            for p, spec in zip(params, specs):
                ok = torch.isfinite(next(checks))
                if not bool(ok.all()):
                    v = self.state[p].get("v") if self.state.get(p) else None
                    held.append((p, spec, ok, p.detach().clone(), None if v is None else v.clone()))
        return held

    def _triton_step(self, work) -> bool:
        """The whole step by the Triton kernels (``fused=True`` on CUDA, eager; see ``nero_torch._triton``), without a
        host sync; or False where they do not apply (as for the C kernel, and float16/bfloat16 parameters too) or
        Triton is not installed."""
        if torch.compiler.is_compiling():
            return False
        fitting = []  # (group, params, grads, states, specs) per group with parameters: all of them must fit
        for group, params, grads, specs in work:
            if not params:
                continue
            if not (group["fused"] and group["foreach"] is not False):
                return False
            states = [self.state.get(p) for p in params]
            if not all(state and _triton_fits(p, g, spec, state) for p, g, spec, state in zip(params, grads, specs,
                                                                                              states)):
                return False
            fitting.append((group, params, grads, states, specs))
        devices = {p.get_device() for _, params, *_ in fitting for p in params}
        kernels = _triton_kernels() if len(devices) == 1 else None
        if kernels is None:
            return False
        device = fitting[0][1][0].device
        groups = [kernels.Group(params, grads, states, [spec.axis is not None for spec in specs], group["centre"],
                                group["normalise"], _kernel_lr(group["lr"], device), group["maximize"], group["beta"])
                  for group, params, grads, states, specs in fitting]
        if self._skipped.device != device:  # counted where the kernels find the verdict, without a sync
            self._skipped = self._skipped.to(device)
        kernels.step(groups, whole=self._skip_mode != "neuron", skipped=self._skipped)
        return True

    def _native_step(self, work) -> bool:
        """The whole step by the C kernel (``fused=True`` on CPU, eager; by default too, where the kernel builds),
        or False where it does not apply: a tensor on another device or of another dtype, not yet initialised, not
        contiguous, or with its neurons on an axis other than 0."""
        if torch.compiler.is_compiling():
            return False
        by_dtype: dict[torch.dtype, list[tuple]] = {}
        asked = False  # whether a group asked for the kernel (fused=True): then a kernel that cannot build warns
        for group, params, grads, specs in work:
            if not params:
                continue
            asked = asked or bool(group["fused"])
            if not (group["fused"] and group["foreach"] is not False) and not _default_native(group):
                return False
            lr, beta = float(group["lr"]) * (-1.0 if group["maximize"] else 1.0), group["beta"]  # lr signed
            for p, g, spec in zip(params, grads, specs):
                state = self.state.get(p)
                if not (state and _native_fits(p, g, spec)):
                    return False
                rows = p.shape[0] if spec.axis == 0 else p.numel()
                by_dtype.setdefault(p.dtype, []).append(
                    (p.detach(), g, state, (rows, p.numel() // rows), _native_flags(spec), lr, beta)
                )
        if (_native.library() if asked else _native.built()) is None:
            return False
        batches = [(_native.Batch([e[1] for e in mine], [e[2] for e in mine], [e[3] for e in mine],
                                  [e[6] for e in mine]), mine) for mine in by_dtype.values()]

        def arguments(mine):  # parameters, flags and signed learning rates, in the batch's order
            return [e[0] for e in mine], [e[4] for e in mine], [e[5] for e in mine]

        if self._skip_mode == "neuron":  # one pass: each row checked as it is read, the bad ones held back
            if any([_native.step(batch, *arguments(mine)) for batch, mine in batches]):  # every batch, then count
                self._skipped += 1
            return True
        if not all([_native.new_v(batch) for batch, _ in batches]):  # every batch's check, then the verdict
            self._skipped += 1
            return True
        for batch, mine in batches:
            _native.apply(batch, *arguments(mine))
        return True

    def _step_sizes(self, group, params, grads, specs) -> list[StepSizes | None]:
        """Phase one for each tensor, or None where the core rule updates it (first update, empty tensor, or
        ``foreach=False``)."""
        if group["foreach"] is False:
            return [None] * len(params)
        hyper = dict(lr=group["lr"], beta=group["beta"], maximize=group["maximize"])
        states = [self.state.get(p) for p in params]  # .get: a skipped first step must leave no entry behind
        return [
            _kernel(_step_sizes_flat, group["fused"], s, g.device)(g, st["v"], st["step"], st["sigma"], s, **hyper)
            if st and g.numel() else None
            for g, st, s in zip(grads, states, specs)
        ]

    def _apply(self, group, params, grads, specs, sizes, finite) -> None:
        if not params:  # a group none of whose parameters has a gradient this step
            return
        by_core = [i for i, s in enumerate(sizes) if s is None]
        for i in by_core:
            if not self.state[params[i]]:
                self.state[params[i]].update(_initial_state(params[i], specs[i]))
        if by_core:  # the first update (projection, sigma) is the core rule's, exactly
            reference_update(
                [params[i] for i in by_core], [grads[i] for i in by_core], [self.state[params[i]] for i in by_core],
                [specs[i] for i in by_core], lr=group["lr"], beta=group["beta"], maximize=group["maximize"],
            )
        taken = finite if finite is not None else torch.ones((), dtype=torch.bool, device=params[0].device)
        for p, g, spec, s in zip(params, grads, specs, sizes):
            if s is not None:
                st = self.state[p]
                kernel = _kernel(_apply_step_flat, group["fused"], spec, p.device)
                flag = finite if kernel is _apply_step_flat else taken  # compiled kernels are branch-free
                # detach: dynamo gives Parameters static sizes, a plain view of the same memory stays dynamic
                kernel(p.detach(), g, st["v"], st["step"], st["sigma"], spec, *s, flag)

    def _gather(self, group: dict[str, Any], offset: int):
        """The group's parameters with a gradient, and the group as this step reads it (its lr as a scalar)."""
        params, grads, specs = [], [], []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"Nero does not support sparse gradients: {_name(group, i, p, offset + i)}")
            if p.is_meta:
                raise RuntimeError(
                    f"Nero cannot step {_name(group, i, p, offset + i)}: it is on the meta device, with no values "
                    "(materialise the model first, e.g. with model.to_empty(device=...))"
                )
            params.append(p)
            grads.append(p.grad)
            specs.append(_spec(p, group))
        if params and isinstance(group["lr"], Tensor):
            group = {**group, "lr": _step_lr(group["lr"], params[0].device)}
        return group, params, grads, specs


# The kernels take tensors as plain arguments, so that one torch.compile(dynamic=True) serves every shape of a rank.
def _step_sizes_flat(g, v, step, sigma, spec, *, lr, beta, maximize) -> StepSizes:
    return step_sizes(g, {"v": v, "step": step, "sigma": sigma}, spec, lr=lr, beta=beta, maximize=maximize)


def _apply_step_flat(p, g, v, step, sigma, spec, v_new, c, sg, gg, finite) -> None:
    apply_step(p, g, {"v": v, "step": step, "sigma": sigma}, spec, StepSizes(v_new, c, sg, gg), finite)


_COMPILED: dict[Callable, Callable] = {}


def _kernel(fn: Callable, fused: bool | None, spec: TensorSpec, device: torch.device) -> Callable:
    """``fn``, or for neuron tensors under ``fused=True`` its ``torch.compile``'d form (once per rank, sizes
    dynamic) where torch.compile works on ``device``. Bias-like tensors are small: a compiled call would cost more
    in guards than it saves."""
    if not fused or spec.axis is None or not _native.compiles(device.type):
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def _step_lr(lr: Tensor, device: torch.device) -> Tensor:
    """A 1-element tensor lr as the 0-d tensor the kernels broadcast (a view of it, read where it lies: a CPU tensor
    is a scalar to kernels on any device, without a sync); one on another accelerator is copied to ``device``."""
    lr = lr.reshape(())
    return lr if lr.device == device or lr.device.type == "cpu" else lr.to(device, non_blocking=True)


# Whether the default (fused=None, foreach=None) takes the C kernel on CPU where it builds (tests switch it off to
# reach torch's kernels, as fused=False does).
_DEFAULT_NATIVE = True


def _default_native(group: dict[str, Any]) -> bool:
    return _DEFAULT_NATIVE and group["fused"] is None and group["foreach"] is None


def _native_fits(p: Tensor, g: Tensor, spec: TensorSpec) -> bool:
    return p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) and _rows_fit(p, g, spec)


def _rows_fit(p: Tensor, g: Tensor, spec: TensorSpec) -> bool:
    """Whether a fused kernel reads ``p`` and ``g`` as contiguous rows (neurons on axis 0) or elements (cheap
    checks first: the Triton path makes them for every tensor at every step)."""
    return (
        spec.axis in (0, None) and g.dtype == p.dtype and g.get_device() == p.get_device() and p.is_contiguous()
        and g.is_contiguous() and g.layout == torch.strided and p.numel() > 0
    )


# Nero(fused=True) runs the Triton kernels on CUDA tensors; tests switch this on to run them on CPU tensors in
# Triton's interpreter.
_TRITON_ON_CPU = False
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _triton_fits(p: Tensor, g: Tensor, spec: TensorSpec, state: dict[str, Tensor]) -> bool:
    return (
        (p.is_cuda or (_TRITON_ON_CPU and p.is_cpu)) and p.dtype in _TRITON_DTYPES and _rows_fit(p, g, spec)
        and state["step"].dtype == torch.float32 and state["v"].dtype == compute_dtype(p.dtype)
    )


def _triton_kernels() -> Any:
    """``nero_torch._triton`` (imported where it is first needed), or None where Triton cannot be imported."""
    return importlib.import_module(f"{__package__}._triton") if _triton_imports() else None


@functools.cache
def _triton_imports() -> bool:
    try:
        importlib.import_module(f"{__package__}._triton")
    except ImportError as error:
        why = Unavailable(f"Triton cannot be imported ({error})", "Install it (pip install triton) for the Triton "
                          "kernels; torch's CUDA wheels bring it.")
        warn_unavailable("Nero(fused=True)", why, "the torch.compile'd kernels", stacklevel=5)
        return False
    return True


def _kernel_lr(lr: float | Tensor, device: torch.device) -> float | Tensor:
    """A group's lr as the Triton kernels take it: a tensor on ``device`` is read there (float32 or float64); a CPU
    tensor is a number (read without a device sync)."""
    if not isinstance(lr, Tensor):
        return lr
    if lr.device != device:
        return float(lr)
    return lr if lr.dtype in (torch.float32, torch.float64) else lr.to(torch.float32)


def _native_flags(spec: TensorSpec) -> int:
    if spec.axis is None:
        return 0
    return (_native.CENTRE if spec.centre else 0) | (_native.NORMALISE if spec.normalise else 0)


def _all_finite(row_sums: list[Tensor]) -> Tensor:
    devices = {s.device for s in row_sums}
    device = next(iter(devices))
    flags = [torch.isfinite(s).all().to(device) for s in row_sums]
    return torch.stack(flags).all()


def _initial_state(p: Tensor, spec: TensorSpec) -> dict[str, Tensor]:
    dtype = compute_dtype(p.dtype)
    shape = tuple(p.shape) if spec.axis is None else (p.shape[spec.axis],)
    return {
        "step": torch.zeros((), dtype=_get_scalar_dtype(), device=p.device),  # as torch's: float64 under float64
        "v": torch.zeros(shape, dtype=dtype, device=p.device),
        "sigma": torch.zeros((), dtype=dtype, device=p.device),
    }


def _checked_state(p: Tensor, state: dict[str, Any], spec: TensorSpec, name: str) -> dict[str, Tensor]:
    """A copy of one parameter's saved state on its device and in its compute dtype, or a clear error."""
    missing = {"step", "v", "sigma"} - set(state)
    if missing:
        raise ValueError(f"the saved state for {name} lacks {sorted(missing)}: it is not Nero's state")
    expected = _initial_state(p, spec)
    for key, like in expected.items():
        value = torch.as_tensor(state[key])
        if tuple(value.shape) != tuple(like.shape):
            raise ValueError(
                f"the saved state {key!r} for {name} has shape {tuple(value.shape)}, but this parameter needs "
                f"{tuple(like.shape)} (a state dict from a model of different shapes?)"
            )
        if value.is_complex() or value.dtype == torch.bool or (key != "step" and not value.is_floating_point()):
            raise ValueError(f"the saved state {key!r} for {name} has dtype {value.dtype}, not a real float")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"the saved state {key!r} for {name} holds NaN or Inf: the checkpoint is corrupt")
        if key == "step" and bool(value < 0):
            raise ValueError(f"the saved step for {name} is {value.item()}, but a step count is >= 0")
    return {
        key: torch.as_tensor(state[key]).to(device=like.device, dtype=like.dtype, copy=True)
        for key, like in expected.items()
    }


_NERO_OPTIONS = {"beta", "centre", "normalise", "neuron_axis"}  # in every group of a Nero state dict, none of Adam's


def _skipped_count(value: Any) -> Tensor:
    """The saved count of skipped steps as a fresh int64 tensor, or a clear error."""
    try:
        count = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        count = None
    if count is None or count.numel() != 1 or count.is_floating_point() or count.is_complex() or bool(count < 0):
        raise ValueError(f"the state dict's skipped_steps must be a count >= 0, got {value!r}")
    return count.reshape(()).to(torch.int64).clone()


def _spec(p: Tensor, group: dict[str, Any]) -> TensorSpec:
    return TensorSpec(_neuron_axis(tuple(p.shape), group["neuron_axis"]), group["centre"], group["normalise"])


# The core's rule for which tensors have neurons; static under torch.compile (shapes and options are), marked so
# by add_param_group: marking imports torch._dynamo (seconds), which torch.optim.Optimizer's add_param_group
# imports anyway, so `import nero_torch` stays as cheap as `import torch`.
_neuron_axis = neuron_axis_of


def _name(group: dict[str, Any], i: int, p: Tensor, index: int) -> str:
    names = group.get("param_names")
    where = f"parameter {names[i]!r}" if names else f"parameter {index}"
    return f"{where} (shape {tuple(p.shape)}, dtype {p.dtype})"


def _check_hyperparameters(group: dict[str, Any]) -> None:
    lr, beta, axis = group["lr"], group["beta"], group["neuron_axis"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not bool(torch.isfinite(lr).all() & (lr >= 0).all()):
            raise ValueError(f"Invalid learning rate: {lr!r} (a finite number >= 0)")
    elif not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"Invalid learning rate: {lr!r} (a finite number >= 0)")
    if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
        raise ValueError(f"Invalid beta: {beta!r} (a number in [0, 1))")
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
        raise TypeError(f"neuron_axis must be an int or None, got {axis!r}")


def _check_param(p: Tensor, group: dict[str, Any], name: str) -> None:
    if p.is_complex():
        raise TypeError(f"Nero does not support complex parameters: {name}")
    if not p.is_floating_point():
        raise TypeError(f"Nero needs real floating-point parameters: {name}")
    if p.layout != torch.strided:
        raise TypeError(f"Nero does not support sparse parameters ({p.layout}): {name}")
    axis = group["neuron_axis"]
    if axis is not None and p.ndim >= 2 and not -p.ndim <= axis < p.ndim:
        raise ValueError(f"neuron_axis {axis} is out of range for {name} with {p.ndim} dimensions")
