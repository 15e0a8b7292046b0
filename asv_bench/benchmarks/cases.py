"""Optimizer steps ready to measure: one backend, one optimizer, one shape set, with fixed random gradients.

``make_case(backend, optimizer, shape_set)`` builds parameters and gradients on the backend's device, the
optimizer as its users run it, and takes two warm-up steps (which also compile jitted and ``torch.compile``'d
steps and create lazily made state). A backend, device or optimizer this machine lacks raises
:class:`Unavailable`, a ``NotImplementedError``, which asv reports as a skip when it comes from ``setup``.

Backends and the optimizers measured on each (``BACKENDS``):

* ``numpy``, ``cupy``: ``nero`` is ``nero_core.nero`` itself; ``adam`` and ``sgd`` are baselines written here
  with in-place operators (NumPy and CuPy ship no optimizers).
* ``torch-cpu``, ``torch-cuda``: ``nero``, ``nero-torch-kernels``, ``nero-fused`` and ``nero-fused-neuron`` are
  ``nero_torch.Nero`` as built by default (on CPU the C kernel where it builds), with ``fused=False`` (torch's
  kernels: the default without a C compiler), ``fused=True``, and ``fused=True, skip_nonfinite="neuron"`` (one
  pass over memory on CPU);
  ``nero-core`` is ``nero_core.nero`` called on the tensors, the result copied back in place (the reference the
  adapter should beat); ``adam`` is ``torch.optim.Adam()`` as most users build it (on CPU its per-tensor loop),
  ``adam-fused``/``adam-foreach`` are ``torch.optim.Adam`` with those options; ``lamb`` is
  ``pytorch_optimizer.Lamb``; ``muon`` is ``torch.optim.Muon`` on hidden 2-D weights with fused Adam for the rest;
  ``sgd`` is ``torch.optim.SGD(foreach=True)`` without momentum, the bandwidth floor; ``star`` is
  ``nero_torch.Star`` with its shipped meta-parameters.
* ``jax-cpu``, ``jax-gpu`` (every step ``jax.jit``'d, parameters and state donated): ``nero`` is
  ``nero_optax.nero``; ``nero-core`` is ``nero_core.nero`` jitted directly; ``adam``, ``lamb``, ``sgd`` are
  ``optax.adam``, ``optax.lamb``, ``optax.sgd``; ``muon`` is ``optax.contrib.muon`` on hidden 2-D weights with its
  built-in Adam for the rest; ``star`` is ``nero_optax.star``. JAX runs the Flax layout ((in, out) kernels), so Nero gets per-tensor neuron axes.

Every step is finished when ``step()`` returns: CUDA is synchronised, JAX is blocked on.

``ADAM`` names each backend's best Adam and ``RATIO_OPTIMIZERS`` the optimizers measured as ratios to it and to
``sgd``. The suite also measures past commits (``asv_bench/history.py``): an adapter of a version that lacks an
optimizer or an option (``Star``, ``fused=``, ``skip_nonfinite="neuron"``) makes that case :class:`Unavailable`.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import memory
from .shapes import Tensor, shape_set

__all__ = ["ADAM", "BACKENDS", "RATIO_OPTIMIZERS", "Case", "Unavailable", "make_case", "tree_nbytes"]

_TORCH = (
    "nero", "nero-torch-kernels", "nero-fused", "nero-fused-neuron", "nero-core", "adam", "adam-fused",
    "adam-foreach", "lamb", "muon", "sgd", "star",
)
_JAX = ("nero", "nero-core", "adam", "lamb", "muon", "sgd", "star")
_ARRAY_API = ("nero", "adam", "sgd")

BACKENDS: dict[str, tuple[str, ...]] = {
    "numpy": _ARRAY_API,
    "torch-cpu": _TORCH,
    "jax-cpu": _JAX,
    "torch-cuda": _TORCH,
    "jax-gpu": _JAX,
    "cupy": _ARRAY_API,
}

# The framework's best Adam: torch's fused kernel, jitted optax, the in-place baseline for NumPy and CuPy.
ADAM = {"numpy": "adam", "torch-cpu": "adam-fused", "jax-cpu": "adam", "torch-cuda": "adam-fused",
        "jax-gpu": "adam", "cupy": "adam"}
RATIO_OPTIMIZERS = {
    backend: tuple(o for o in optimizers if (o.startswith("nero") and o != "nero-core") or o == "star")
    for backend, optimizers in BACKENDS.items()
}

# Learning rates only keep values tame over thousands of timed steps; they do not change the work done.
LR = 1e-3
NERO_LR = 0.01
MUON_LR = 0.02
GRAD_SCALE = 0.01


class Unavailable(NotImplementedError):
    """This machine cannot run the case (library, device or optimizer missing): asv counts it as skipped."""


def tree_nbytes(tree: Any) -> int:
    """Bytes held by the arrays in any nesting of dicts, lists and tuples (NamedTuples included)."""
    if isinstance(tree, dict):
        return sum(tree_nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tree_nbytes(v) for v in tree)
    nbytes = getattr(tree, "nbytes", None)
    return int(nbytes) if isinstance(nbytes, (int, np.integer)) else 0


class Case:
    """One optimizer on one shape set and backend: ``step()``, its state and its memory."""

    def __init__(
        self,
        step: Callable[[], None],
        state: Callable[[], Any],
        device_peak: Callable[[Callable[[], None]], tuple[int, int]] | None = None,
    ) -> None:
        self.step = step
        self._state = state
        self._device_peak = device_peak

    @property
    def on_gpu(self) -> bool:
        return self._device_peak is not None

    def state_bytes(self) -> int:
        return tree_nbytes(self._state())

    def step_peak(self, steps: int = 3) -> tuple[int, int]:
        """``(peak, extra)`` bytes during a step: the peak in use, and how far it rose above what was resident; the
        largest of ``steps`` steps, each measured alone (host memory is read from the resident set, which pages
        reclaimed from this process during a step lower: on a loaded machine one step read SGD's temporary as 0.84
        of its size)."""
        measure = self._device_peak or memory.host_step_peak
        return max(measure(self.step) for _ in range(steps))


def _require(module: str, attribute: str | None = None) -> Any:
    try:
        found = importlib.import_module(module)
        return getattr(found, attribute) if attribute else found
    except (ImportError, AttributeError) as exc:
        name = f"{module}.{attribute}" if attribute else module
        raise Unavailable(f"{name} is not importable: {exc}") from None


def _host_values(tensors: Sequence[Tensor], layout: str, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """float32 parameters ~ N(0, 1/fan_in) and gradients ~ N(0, GRAD_SCALE^2), in the ``torch`` or ``flax`` layout."""
    rng = np.random.default_rng(seed)
    params, grads = [], []
    for t in tensors:
        shape = t.torch_shape if layout == "torch" else t.flax_shape
        params.append(rng.standard_normal(shape, dtype=np.float32) * np.float32(1 / math.sqrt(t.fan_in)))
        grads.append(rng.standard_normal(shape, dtype=np.float32) * np.float32(GRAD_SCALE))
    return params, grads


# --- NumPy and CuPy -----------------------------------------------------------------------------------------------


class _AdamBaseline:
    """Textbook Adam with in-place operators: the baseline for array libraries that ship no optimizer."""

    def __init__(self, params: list[Any], xp: Any, lr: float = LR, b1: float = 0.9, b2: float = 0.999) -> None:
        self.params, self.xp, self.lr, self.b1, self.b2, self.t = params, xp, lr, b1, b2, 0
        self.m = [xp.zeros_like(p) for p in params]
        self.v = [xp.zeros_like(p) for p in params]

    def step(self, grads: list[Any]) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * (g * g)
            p -= (self.lr / c1) * m / (self.xp.sqrt(v / c2) + 1e-8)


def _array_api_case(backend: str, optimizer: str, tensors: Sequence[Tensor]) -> Case:
    host_params, host_grads = _host_values(tensors, "torch")
    if backend == "numpy":
        xp, to_device, sync, device_peak = np, (lambda a: a), (lambda: None), None
    else:
        cupy = _require("cupy")
        try:
            if cupy.cuda.runtime.getDeviceCount() == 0:
                raise Unavailable("cupy sees no GPU")
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise Unavailable(f"cupy sees no GPU: {exc}") from None
        xp, to_device, sync, device_peak = cupy, cupy.asarray, cupy.cuda.Device().synchronize, _cupy_peak
    params = [to_device(p) for p in host_params]
    grads = [to_device(g) for g in host_grads]
    del host_params, host_grads

    if optimizer == "nero":
        rule = _require("nero_core", "nero")(NERO_LR)
        holder = {"params": params, "state": rule.init(params)}
        options = _donating(rule.update)

        def step() -> None:
            holder["params"], holder["state"] = rule.update(grads, holder["state"], holder["params"], **options)
            sync()

        return Case(step, lambda: holder["state"], device_peak)
    if optimizer == "adam":
        adam = _AdamBaseline(params, xp)

        def step() -> None:
            adam.step(grads)
            sync()

        return Case(step, lambda: (adam.m, adam.v), device_peak)
    if optimizer == "sgd":

        def step() -> None:
            for p, g in zip(params, grads):
                p -= LR * g
            sync()

        return Case(step, lambda: (), device_peak)
    raise ValueError(f"unknown optimizer {optimizer!r} for {backend}")


def _cupy_peak(step: Callable[[], None]) -> tuple[int, int]:
    import cupy

    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()  # the pool now holds only live blocks, and grows to the step's peak
    before = pool.used_bytes()
    step()
    peak = pool.total_bytes()
    return peak, peak - before


# --- PyTorch --------------------------------------------------------------------------------------------------------


class _TorchCoreRule:
    """``nero_core.nero`` on torch tensors as a pure function, the new values copied back into the parameters."""

    def __init__(self, params: list[Any]) -> None:
        self.params = params
        self.rule = _require("nero_core", "nero")(NERO_LR)
        self.state = self.rule.init([p.detach() for p in params])

    def step(self) -> None:
        params = [p.detach() for p in self.params]
        new, self.state = self.rule.update([p.grad for p in self.params], self.state, params,
                                           **_donating(self.rule.update))
        for p, n in zip(params, new):
            if n.data_ptr() != p.data_ptr():  # (written in place where the rule takes donate=True)
                p.copy_(n)


def _donating(update: Callable[..., Any]) -> dict[str, Any]:
    """``{"donate": True}`` where the core's update takes it (it then writes the new values into the parameters, as
    a user's training loop would let it), else nothing (older revisions in the benchmark history)."""
    return {"donate": True} if "donate" in inspect.signature(update).parameters else {}


def _with_options(make: Callable[..., Any], *args: Any, **options: Any) -> Any:
    """``make(*args, **options)``, or :class:`Unavailable` where this version of the adapter lacks an option."""
    try:
        return make(*args, **options)
    except TypeError as exc:
        raise Unavailable(f"{make.__module__}.{make.__name__} takes no {sorted(options)} here: {exc}") from None


def _torch_optimizers(optimizer: str, params: list[Any], tensors: Sequence[Tensor]) -> list[Any]:
    import torch

    if optimizer == "nero":
        return [_require("nero_torch", "Nero")(params, lr=NERO_LR)]
    if optimizer == "nero-torch-kernels":
        return [_with_options(_require("nero_torch", "Nero"), params, lr=NERO_LR, fused=False)]
    if optimizer == "nero-fused":
        return [_with_options(_require("nero_torch", "Nero"), params, lr=NERO_LR, fused=True)]
    if optimizer == "nero-fused-neuron":
        nero = _require("nero_torch", "Nero")
        return [_with_options(nero, params, lr=NERO_LR, fused=True, skip_nonfinite="neuron")]
    if optimizer == "star":
        return [_require("nero_torch", "Star")(params)]
    if optimizer == "nero-core":
        return [_TorchCoreRule(params)]
    if optimizer == "adam":
        return [torch.optim.Adam(params, lr=LR)]
    if optimizer == "adam-fused":
        return [torch.optim.Adam(params, lr=LR, fused=True)]
    if optimizer == "adam-foreach":
        return [torch.optim.Adam(params, lr=LR, foreach=True)]
    if optimizer == "lamb":
        return [_require("pytorch_optimizer", "Lamb")(params, lr=LR)]
    if optimizer == "muon":
        hidden = [p for p, t in zip(params, tensors) if t.role == "hidden" and p.ndim == 2]
        rest = [p for p, t in zip(params, tensors) if not (t.role == "hidden" and p.ndim == 2)]
        muon = [_require("torch.optim", "Muon")(hidden, lr=MUON_LR, weight_decay=0.0)] if hidden else []
        return muon + ([torch.optim.Adam(rest, lr=LR, fused=True)] if rest else [])
    if optimizer == "sgd":
        return [torch.optim.SGD(params, lr=LR, foreach=True)]
    raise ValueError(f"unknown optimizer {optimizer!r} for torch")


def _torch_case(backend: str, optimizer: str, tensors: Sequence[Tensor]) -> Case:
    torch = _require("torch")
    device = "cuda" if backend == "torch-cuda" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("torch sees no CUDA device")
    generator = torch.Generator(device).manual_seed(0)
    params = []
    for t in tensors:
        p = torch.randn(t.torch_shape, generator=generator, device=device).div_(math.sqrt(t.fan_in))
        p.requires_grad_()
        p.grad = torch.randn(t.torch_shape, generator=generator, device=device).mul_(GRAD_SCALE)
        params.append(p)
    optimizers = _torch_optimizers(optimizer, params, tensors)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> None:
        for opt in optimizers:
            opt.step()
        sync()

    return Case(step, lambda: [opt.state for opt in optimizers], _torch_cuda_peak if device == "cuda" else None)


def _torch_cuda_peak(step: Callable[[], None]) -> tuple[int, int]:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    peak = torch.cuda.max_memory_allocated()
    return peak, peak - before


# --- JAX ------------------------------------------------------------------------------------------------------------


def _optax_transform(optimizer: str, tensors: Sequence[Tensor]) -> Any:
    optax = _require("optax")
    if optimizer == "nero":
        return _require("nero_optax", "nero")(NERO_LR, neuron_axis=[t.flax_axis for t in tensors])
    if optimizer == "adam":
        return optax.adam(LR)
    if optimizer == "lamb":
        return optax.lamb(LR)
    if optimizer == "muon":
        contrib = _require("optax.contrib")
        dims = contrib.MuonDimensionNumbers()  # (in, out) kernels: reduce over axis 0
        hidden = [dims if t.role == "hidden" and len(t.flax_shape) == 2 else None for t in tensors]
        return contrib.muon(MUON_LR, adam_learning_rate=LR, muon_weight_dimension_numbers=hidden)
    if optimizer == "sgd":
        return optax.sgd(LR)
    if optimizer == "star":
        return _require("nero_optax", "star")()
    raise ValueError(f"unknown optimizer {optimizer!r} for jax")


def _jax_case(backend: str, optimizer: str, tensors: Sequence[Tensor]) -> Case:
    jax = _require("jax")
    platform = "gpu" if backend == "jax-gpu" else "cpu"
    try:
        device = jax.devices(platform)[0]
    except RuntimeError as exc:
        raise Unavailable(f"jax has no {platform} device: {exc}") from None
    host_params, host_grads = _host_values(tensors, "flax")
    params = [jax.device_put(p, device) for p in host_params]
    grads = [jax.device_put(g, device) for g in host_grads]
    del host_params, host_grads

    if optimizer == "nero-core":
        rule = _require("nero_core", "nero")(NERO_LR, neuron_axis=[t.flax_axis for t in tensors])
        state = rule.init(params)

        def update(params: Any, state: Any, grads: Any) -> Any:
            return rule.update(grads, state, params)

    else:
        optax = _require("optax")
        transform = _optax_transform(optimizer, tensors)
        state = transform.init(params)

        def update(params: Any, state: Any, grads: Any) -> Any:
            updates, state = transform.update(grads, state, params)
            return optax.apply_updates(params, updates), state

    jitted = jax.jit(update, donate_argnums=(0, 1))
    holder = {"params": params, "state": state}

    def step() -> None:
        holder["params"], holder["state"] = jitted(holder["params"], holder["state"], grads)
        jax.block_until_ready(holder)

    def gpu_peak(step: Callable[[], None]) -> tuple[int, int]:
        # JAX's peak counter cannot be reset: this is the process's peak, right for a fresh process.
        before = device.memory_stats()["bytes_in_use"]
        step()
        peak = device.memory_stats()["peak_bytes_in_use"]
        return peak, peak - before

    return Case(step, lambda: holder["state"], gpu_peak if platform == "gpu" else None)


_BUILDERS = {
    "numpy": _array_api_case,
    "cupy": _array_api_case,
    "torch-cpu": _torch_case,
    "torch-cuda": _torch_case,
    "jax-cpu": _jax_case,
    "jax-gpu": _jax_case,
}


def make_case(backend: str, optimizer: str, shapes: str, warmup: int = 2) -> Case:
    """Build ``optimizer`` on ``backend`` for the shape set ``shapes`` and take ``warmup`` steps."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {list(BACKENDS)}")
    if optimizer not in BACKENDS[backend]:
        raise ValueError(f"unknown optimizer {optimizer!r} for {backend}; choose from {BACKENDS[backend]}")
    case = _BUILDERS[backend](backend, optimizer, shape_set(shapes))
    for _ in range(warmup):
        case.step()
    return case
