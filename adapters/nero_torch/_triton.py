"""The GPU kernels of ``Nero(fused=True)``: Nero's steady-state step in Triton, a few launches for a whole model.

The maths is the C kernel's (``_native.c``; docs/design.md, "Native kernels"). Per neuron row ``w`` of fan-in ``k``
with gradient ``g``: ``v = beta*v + (1-beta)|g|^2`` (in the state's dtype), ``c = lr*sigma/sqrt(v/(1-beta^t))``
(0 where ``v = 0``), ``y = w - c*g``, and the row is written as ``(y - mean(y)) * 1/|y - mean(y)|`` (as centre and
normalise say; a zero row stays zero). Mean and norm come from the five sums ``sum(w)``, ``|w|^2``, ``<w, g>``,
``sum(g)``, ``|g|^2`` of one read of the row::

    sum(y) = sum(w) - c sum(g),    |y - mean(y)|^2 = |w|^2 - 2c<w, g> + c^2|g|^2 - sum(y) mean(y)

in float64, and from ``y`` itself where those terms cancel (a near-constant row, a large common offset). Bias-like
tensors are updated elementwise (``v`` per element, never centred or normalised). Parameters may be float32,
bfloat16, float16 or float64; the state is float32 (float64 for float64 parameters), and sums are taken in it.

How the work is laid out (as torch's fused Adam walks a table of tensors in one launch, ``multi_tensor_apply``):
one table on the device holds every tensor's addresses, shape, options, ``lr`` and ``beta``; each launch walks a
table of blocks, each naming a tensor and its first row (or element). One launch serves all the tensors of a
dtype whose rows fit one block of the same power-of-two width (a row held in registers: read once, written once),
one the rows wider than :data:`MAX_BLOCK` (two stages in one program: sums over chunks, then a write pass), one the
bias-like tensors; a last one-program launch advances the step counts. The non-finite policies:

- ``skip_nonfinite="step"``: a first set of launches reads the gradients (and ``v``) for the new ``v`` and raises a
  flag in device memory where one is not finite; the writing launches read the flag and write nothing if it is up.
  No host sync: the step count and ``skipped`` follow the flag on the device.
- ``"neuron"``: one set of launches; a row (element) whose new ``v`` is not finite keeps its weights and ``v``.

A tensor ``lr`` on the parameters' device is read in the kernels, where it lies; the host never waits for it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["MAX_BLOCK", "Group", "step"]

# Widest row one program holds in registers (elements); wider rows take the two-stage path in chunks of WIDE_CHUNK.
MAX_BLOCK = 8192
WIDE_CHUNK = 2048
# Elements per program for narrow rows (several rows to a program) and for bias-like tensors.
TILE = 2048
ELEMENT_BLOCK = 1024

# The per-tensor table: one int64 row per tensor (floats stored as their bits).
_COLUMNS = ("p", "g", "v", "sigma", "step", "lr_address", "rows", "cols", "flags", "lr", "beta")
NCOL = tl.constexpr(len(_COLUMNS))
_P, _G, _V, _SIGMA, _STEP, _LR_ADDRESS, _ROWS, _COLS, _FLAGS, _LR, _BETA = (tl.constexpr(i) for i in range(NCOL))
# Flags: the constraints, and where lr is read from memory, its dtype.
CENTRE, NORMALISE, LR_F32, LR_F64 = (tl.constexpr(1 << i) for i in range(4))
# Launch modes: read the gradients and raise the flag where a new v is not finite; write unless the flag is up;
# write, holding back the rows whose new v is not finite (and raise the flag for the count of skipped steps).
CHECK, WHOLE, NEURON = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
# Below this share of its terms' magnitude, |y - mean(y)|^2 from the old row's sums has lost too many bits.
CANCELLATION = tl.constexpr(0.5)
INF = tl.constexpr(float("inf"))

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.float64: tl.float64}


# ---- device functions: the per-row maths every kernel shares -----------------------------------------------------


@triton.jit
def _address(meta, column, DTYPE: tl.constexpr):
    """The pointer a table row holds in ``column``, to ``DTYPE``."""
    return tl.load(meta + column).to(tl.pointer_type(DTYPE))


@triton.jit
def _finite(x):
    return tl.abs(x) < INF  # False for NaN too


@triton.jit
def _raise_flag(flag, bad):
    """Set ``*flag = 1`` where any of ``bad`` holds (every program writes the same value: no atomics needed)."""
    tl.store(flag, 1, mask=tl.max(bad.to(tl.int32), 0) > 0)


@triton.jit
def _tensor_scalars(meta, V_DTYPE: tl.constexpr):
    """A tensor's ``beta`` and ``1 - beta`` in the state dtype, and in float64 the signed ``lr * sigma`` and the
    bias correction ``1 - beta**(t + 1)`` (``t`` the updates taken before this one)."""
    flags = tl.load(meta + _FLAGS)
    lr = tl.load(meta + _LR).to(tl.float64, bitcast=True)  # the signed lr, or its sign where lr is in memory
    if (flags & LR_F32) != 0:
        lr = lr * tl.load(_address(meta, _LR_ADDRESS, tl.float32)).to(tl.float64)
    if (flags & LR_F64) != 0:
        lr = lr * tl.load(_address(meta, _LR_ADDRESS, tl.float64))
    sigma = tl.load(_address(meta, _SIGMA, V_DTYPE)).to(tl.float64)
    t = tl.load(_address(meta, _STEP, tl.float32)).to(tl.float64)
    beta = tl.load(meta + _BETA).to(tl.float64, bitcast=True)
    correction = 1.0 - tl.exp((t + 1.0) * tl.log(beta))  # beta = 0: exp(-inf) = 0
    return beta.to(V_DTYPE), (1.0 - beta).to(V_DTYPE), lr * sigma, correction


@triton.jit
def _new_v(v, gg, beta, decay):
    """``beta*v + (1-beta)*|g|^2`` in the state dtype, as the core rule computes it."""
    return beta * v + decay * gg


@triton.jit
def _step_size(v, scale_lr, correction):
    """``c = lr*sigma / sqrt(v / correction)``, 0 where ``v = 0``, in float64: a subnormal float32 ``v`` is an
    ordinary float64, and ``c*c`` of the spread never overflows."""
    v = v.to(tl.float64)
    positive = v > 0
    return tl.where(positive, scale_lr / tl.sqrt(tl.where(positive, v, 1.0) / correction), 0.0)


@triton.jit
def _row_terms(sw, ww, wg, sg, gg, c, k, centre, normalise):
    """``mean(y)`` and ``|y - mean(y)|^2`` for ``y = w - c*g`` from the old row's sums (float64), and whether they
    cancel (then take them from ``y``): the C kernel's ``row_terms``."""
    cd = c.to(tl.float64)
    sy = sw.to(tl.float64) - cd * sg.to(tl.float64)
    cgg = cd * gg.to(tl.float64)
    mean = tl.where(centre, sy / k, 0.0)
    cwg = 2.0 * cd * wg.to(tl.float64)
    spread = ww.to(tl.float64) - cwg + cd * cgg - sy * mean
    cancels = normalise & ~(spread >= CANCELLATION * (ww.to(tl.float64) + tl.abs(cwg) + cd * cgg))
    return mean, spread, cancels


@triton.jit
def _inverse_norm(spread, normalise):
    """``1/sqrt(spread)`` where normalising a row that is not zero, else 1 (a zero row stays zero)."""
    return tl.where(normalise & (spread > 0), 1.0 / tl.sqrt(tl.where(spread > 0, spread, 1.0)), 1.0)


# ---- kernels ---------------------------------------------------------------------------------------------------


@triton.jit
def _narrow_rows(table, blocks, flag, P_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK: tl.constexpr, MODE: tl.constexpr):
    """``ROWS`` rows of one neuron tensor, each of at most ``BLOCK`` elements, held in registers: read once, written
    once."""
    pid = tl.program_id(0)
    if MODE == WHOLE:
        if tl.load(flag) != 0:
            return
    meta = table + tl.load(blocks + 2 * pid).to(tl.int64) * NCOL
    rows = tl.load(blocks + 2 * pid + 1).to(tl.int64) + tl.arange(0, ROWS)
    k = tl.load(meta + _COLS)
    live = rows < tl.load(meta + _ROWS)
    cols = tl.arange(0, BLOCK)
    mask = live[:, None] & (cols < k)[None, :]
    offsets = rows[:, None] * k + cols[None, :]
    g = tl.load(_address(meta, _G, P_DTYPE) + offsets, mask=mask, other=0.0).to(V_DTYPE)
    v_at = _address(meta, _V, V_DTYPE) + rows
    beta, decay, scale_lr, correction = _tensor_scalars(meta, V_DTYPE)
    gg = tl.sum(g * g, 1)
    v = _new_v(tl.load(v_at, mask=live, other=0.0), gg, beta, decay)
    taken = live & _finite(v)
    if MODE == CHECK:
        _raise_flag(flag, live & ~taken)
        return
    p_at = _address(meta, _P, P_DTYPE) + offsets
    w = tl.load(p_at, mask=mask, other=0.0).to(V_DTYPE)
    flags = tl.load(meta + _FLAGS)
    centre, normalise = (flags & CENTRE) != 0, (flags & NORMALISE) != 0
    c = _step_size(v, scale_lr, correction).to(V_DTYPE)
    mean, spread, cancels = _row_terms(tl.sum(w, 1), tl.sum(w * w, 1), tl.sum(w * g, 1), tl.sum(g, 1), gg, c, k,
                                       centre, normalise)
    cancels = cancels & taken
    y = w - c[:, None] * g
    if tl.max(cancels.to(tl.int32), 0) > 0:  # rare: those rows' mean and spread from y itself, in float64
        y_mean = tl.where(centre, tl.sum(y.to(tl.float64), 1) / k, 0.0).to(V_DTYPE)
        d = tl.where(mask, (y - y_mean[:, None]).to(tl.float64), 0.0)
        mean = tl.where(cancels, y_mean.to(tl.float64), mean)
        spread = tl.where(cancels, tl.sum(d * d, 1), spread)
    out = (y - mean.to(V_DTYPE)[:, None]) * _inverse_norm(spread, normalise).to(V_DTYPE)[:, None]
    tl.store(p_at, out.to(P_DTYPE), mask=mask & taken[:, None])
    tl.store(v_at, v, mask=taken)
    if MODE == NEURON:
        _raise_flag(flag, live & ~taken)


@triton.jit
def _wide_rows(table, blocks, flag, P_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
               MODE: tl.constexpr):
    """One row wider than a block, in two stages: its sums over chunks of ``BLOCK``, then a pass that writes it
    (and, where the sums cancel, two passes over ``y`` for its mean and spread first)."""
    pid = tl.program_id(0)
    if MODE == WHOLE:
        if tl.load(flag) != 0:
            return
    meta = table + tl.load(blocks + 2 * pid).to(tl.int64) * NCOL
    row = tl.load(blocks + 2 * pid + 1).to(tl.int64)
    k = tl.load(meta + _COLS)
    g_at = _address(meta, _G, P_DTYPE) + row * k
    p_at = _address(meta, _P, P_DTYPE) + row * k
    v_at = _address(meta, _V, V_DTYPE) + row
    sw = tl.zeros([BLOCK], V_DTYPE)
    ww = tl.zeros([BLOCK], V_DTYPE)
    wg = tl.zeros([BLOCK], V_DTYPE)
    sg = tl.zeros([BLOCK], V_DTYPE)
    gg = tl.zeros([BLOCK], V_DTYPE)
    for start in range(0, k, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        g = tl.load(g_at + cols, mask=cols < k, other=0.0).to(V_DTYPE)
        gg += g * g
        if MODE != CHECK:
            w = tl.load(p_at + cols, mask=cols < k, other=0.0).to(V_DTYPE)
            sw += w
            ww += w * w
            wg += w * g
            sg += g
    beta, decay, scale_lr, correction = _tensor_scalars(meta, V_DTYPE)
    gg_row = tl.sum(gg, 0)
    v = _new_v(tl.load(v_at), gg_row, beta, decay)
    taken = _finite(v)
    if MODE == CHECK:
        tl.store(flag, 1, mask=~taken)
        return
    flags = tl.load(meta + _FLAGS)
    centre, normalise = (flags & CENTRE) != 0, (flags & NORMALISE) != 0
    c = _step_size(v, scale_lr, correction).to(V_DTYPE)
    mean, spread, cancels = _row_terms(tl.sum(sw, 0), tl.sum(ww, 0), tl.sum(wg, 0), tl.sum(sg, 0), gg_row, c, k,
                                       centre, normalise)
    if cancels & taken:  # rare: the mean and spread from y itself, in float64
        total = tl.zeros([BLOCK], tl.float64)
        for start in range(0, k, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            w = tl.load(p_at + cols, mask=cols < k, other=0.0).to(V_DTYPE)
            g = tl.load(g_at + cols, mask=cols < k, other=0.0).to(V_DTYPE)
            total += (w - c * g).to(tl.float64)
        y_mean = tl.where(centre, tl.sum(total, 0) / k, 0.0).to(V_DTYPE)
        squares = tl.zeros([BLOCK], tl.float64)
        for start in range(0, k, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            w = tl.load(p_at + cols, mask=cols < k, other=0.0).to(V_DTYPE)
            g = tl.load(g_at + cols, mask=cols < k, other=0.0).to(V_DTYPE)
            d = tl.where(cols < k, (w - c * g - y_mean).to(tl.float64), 0.0)
            squares += d * d
        mean = y_mean.to(tl.float64)
        spread = tl.sum(squares, 0)
    if taken:
        shift = mean.to(V_DTYPE)
        scale = _inverse_norm(spread, normalise).to(V_DTYPE)
        for start in range(0, k, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            w = tl.load(p_at + cols, mask=cols < k, other=0.0).to(V_DTYPE)
            g = tl.load(g_at + cols, mask=cols < k, other=0.0).to(V_DTYPE)
            tl.store(p_at + cols, ((w - c * g - shift) * scale).to(P_DTYPE), mask=cols < k)
        tl.store(v_at, v)
    if MODE == NEURON:
        tl.store(flag, 1, mask=~taken)


@triton.jit
def _elements(table, blocks, flag, P_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
              MODE: tl.constexpr):
    """``BLOCK`` elements of one bias-like tensor: ``v`` per element, ``p -= c*g``."""
    pid = tl.program_id(0)
    if MODE == WHOLE:
        if tl.load(flag) != 0:
            return
    meta = table + tl.load(blocks + 2 * pid).to(tl.int64) * NCOL
    at = tl.load(blocks + 2 * pid + 1).to(tl.int64) + tl.arange(0, BLOCK)
    live = at < tl.load(meta + _ROWS)
    g = tl.load(_address(meta, _G, P_DTYPE) + at, mask=live, other=0.0).to(V_DTYPE)
    v_at = _address(meta, _V, V_DTYPE) + at
    beta, decay, scale_lr, correction = _tensor_scalars(meta, V_DTYPE)
    v = _new_v(tl.load(v_at, mask=live, other=0.0), g * g, beta, decay)
    taken = live & _finite(v)
    if MODE == CHECK:
        _raise_flag(flag, live & ~taken)
        return
    p_at = _address(meta, _P, P_DTYPE) + at
    w = tl.load(p_at, mask=live, other=0.0).to(V_DTYPE)
    c = _step_size(v, scale_lr, correction).to(V_DTYPE)
    tl.store(p_at, (w - c * g).to(P_DTYPE), mask=taken)
    tl.store(v_at, v, mask=taken)
    if MODE == NEURON:
        _raise_flag(flag, live & ~taken)


@triton.jit
def _finish(table, flag, skipped, count, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """After the writing launches: every tensor's step count +1 (under ``WHOLE``, unless the flag is up), and
    ``skipped`` +1 where the flag is up (a step skipped, or one with neurons held back)."""
    up = tl.load(flag) != 0
    if MODE == WHOLE:
        advance = tl.where(up, 0.0, 1.0)
    else:
        advance = 1.0
    for start in range(0, count, BLOCK):
        i = start + tl.arange(0, BLOCK)
        at = tl.load(table + i.to(tl.int64) * NCOL + _STEP, mask=i < count, other=0).to(tl.pointer_type(tl.float32))
        tl.store(at, tl.load(at, mask=i < count) + advance, mask=i < count)
    tl.store(skipped, tl.load(skipped) + up.to(tl.int64))


# ---- the host side -------------------------------------------------------------------------------------------------


class Group(NamedTuple):
    """Initialised parameters that share their options (a parameter group's), for :func:`step`."""

    params: Sequence[Tensor]  # contiguous; a neuron tensor has its neurons on axis 0
    grads: Sequence[Tensor]  # contiguous, their parameter's dtype
    states: Sequence[dict[str, Tensor]]  # v, sigma and a float32 step
    neuron: Sequence[bool]  # per parameter; False: bias-like, updated elementwise
    centre: bool
    normalise: bool
    lr: float | Tensor  # a float, or a 1-element float32/float64 tensor on the parameters' device (read there)
    maximize: bool
    beta: float


def _lr_columns(group: Group) -> tuple[int, int, float]:
    """``(address, flag, value)``: a tensor lr is read in the kernels where it lies (the value is then its sign)."""
    sign = -1.0 if group.maximize else 1.0
    if not isinstance(group.lr, Tensor):
        return 0, 0, sign * float(group.lr)
    flag = {torch.float32: LR_F32.value, torch.float64: LR_F64.value}[group.lr.dtype]
    return group.lr.data_ptr(), flag, sign


def _table(groups: Sequence[Group], device: torch.device) -> tuple[Tensor, tuple]:
    """The table (one row of ``_COLUMNS`` per tensor) on ``device``, and the tensors' ``(dtype, neuron, rows,
    cols)``: built column by column, as it is every step."""
    ints: list[list[int]] = [[] for _ in range(_LR.value)]
    floats: list[list[float]] = [[], []]
    shapes: list[tuple[torch.dtype, bool, int, int]] = []
    for group in groups:
        count = len(group.params)
        numels = [p.numel() for p in group.params]
        rows = [p.shape[0] if neuron else n for p, neuron, n in zip(group.params, group.neuron, numels)]
        address, lr_flag, lr = _lr_columns(group)
        flags = (CENTRE.value if group.centre else 0) | (NORMALISE.value if group.normalise else 0) | lr_flag
        for column, values in zip(ints, (
            [p.data_ptr() for p in group.params], [g.data_ptr() for g in group.grads],
            *([s[key].data_ptr() for s in group.states] for key in ("v", "sigma", "step")),
            [address] * count, rows, [n // r for n, r in zip(numels, rows)], [flags] * count,
        )):
            column += values
        floats[0] += [lr] * count
        floats[1] += [group.beta] * count
        shapes += zip([p.dtype for p in group.params], group.neuron, rows, ints[_COLS.value][-count:])
    table = np.concatenate([np.array(ints, dtype=np.int64), np.array(floats, dtype=np.float64).view(np.int64)])
    host = torch.from_numpy(np.ascontiguousarray(table.T))
    on_device = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    return on_device, tuple(shapes)


class _Launch(NamedTuple):
    kernel: Any
    blocks: Tensor  # int32 (tensor index, first row or element) per program
    options: dict[str, object]


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _warps(elements: int) -> int:
    """Warps for a program of ``elements``: about 8 per thread (registers for w, g and the row's sums, no spills)."""
    return max(4, min(16, elements // 256))


def _blocks(members: list[tuple[int, int, int]], device: torch.device) -> Tensor:
    """The table of programs: ``(tensor, first)`` for each ``(tensor, count, per_program)`` of ``members``."""
    pairs = [(t, first) for t, count, per in members for first in range(0, count, per)]
    return torch.tensor(pairs, dtype=torch.int32).to(device)


@functools.lru_cache(maxsize=32)
def _plan(shapes: tuple[tuple[torch.dtype, bool, int, int], ...], device: torch.device, max_block: int
          ) -> list[_Launch]:
    """The launches for tensors of these ``(dtype, neuron, rows, cols)`` (in the table's order): per dtype, one per
    power-of-two row width up to ``max_block``, one for wider rows and one for bias-like tensors."""
    groups: dict[tuple, list[tuple[int, int, int]]] = {}
    for t, (dtype, neuron, rows, cols) in enumerate(shapes):
        if not neuron:
            groups.setdefault((dtype, "elements", ELEMENT_BLOCK), []).append((t, rows * cols, ELEMENT_BLOCK))
        elif cols > max_block:
            groups.setdefault((dtype, "wide", min(WIDE_CHUNK, max_block)), []).append((t, rows, 1))
        else:
            block = max(_pow2(cols), 16)
            rows_per = max(1, min(TILE, max_block) // block)
            groups.setdefault((dtype, "narrow", block), []).append((t, rows, rows_per))
    launches = []
    for (dtype, kind, block), members in groups.items():
        options: dict[str, object] = dict(P_DTYPE=_TL_DTYPES[dtype], BLOCK=block,
                                          V_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32)
        if kind == "narrow":
            kernel, rows_per = _narrow_rows, members[0][2]
            options.update(ROWS=rows_per, num_warps=_warps(rows_per * block))
        else:
            kernel = _wide_rows if kind == "wide" else _elements
            options.update(num_warps=_warps(block))
        launches.append(_Launch(kernel, _blocks(members, device), options))
    return launches


def step(groups: Sequence[Group], *, whole: bool, skipped: Tensor) -> None:
    """One Nero step of every parameter of ``groups`` (all on one device), in place: weights, ``v`` and ``step``.
    ``whole``: a step with a non-finite new ``v`` anywhere is skipped whole; else only those rows (elements) are
    held back. ``skipped`` (an int64 0-d tensor on the device) counts such steps. No host sync."""
    device = groups[0].params[0].device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():  # Triton's device
        table, shapes = _table(groups, device)
        flag = torch.zeros(1, dtype=torch.int32, device=device)
        plan = _plan(shapes, device, MAX_BLOCK)
        for mode in ((CHECK, WHOLE) if whole else (NEURON,)):
            for launch in plan:
                launch.kernel[(launch.blocks.shape[0],)](
                    table, launch.blocks, flag, MODE=mode, enable_fp_fusion=False, **launch.options
                )
        _finish[(1,)](table, flag, skipped, len(shapes), MODE=WHOLE if whole else NEURON, BLOCK=128,
                      enable_fp_fusion=False)
