"""STAR's step for one tensor in torch, in place: the core rule's maths (``nero_core._star._step``) over blocks of
rows, with every per-element array written into buffers reused from block to block.

The core rule is pure: each block's 16 channels, the MLP's layers and the update are new tensors, and the new
parameter is a concatenation of the blocks. Here the channels of a block go into one ``(16, n)`` buffer, the layers
into ``(4, n)`` buffers (``torch.mm``/``addmm`` with ``out=``), and the update into the parameter itself: a step
allocates nothing per element. The small pieces (Adafactor factors, the first layer's shares from the row and
column channels, the normalised first-layer weights) are the core's own functions. Tested against the core rule in
``tests/test_star_adapters.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import array_api_compat.torch as xp
import torch

from nero_core._star import (
    _ELEMENT_ROWS,
    EXP_MULT,
    MAX_LOG_SCALE,
    NUM_OUTPUTS,
    _adafactor_factors,
    _block_rows,
    _factored_parts,
    _rows_of,
    _scaled_rows,
)

__all__ = ["step_in_place"]


def _product(factors: list[torch.Tensor], shape: tuple[int, ...], out: torch.Tensor) -> torch.Tensor:
    """``rowfac * colfac`` broadcast to ``shape`` (written into ``out``), or the one full factor unfactored."""
    if len(factors) == 1:
        return factors[0]
    return torch.mul(factors[0], factors[1], out=out.view(shape))


class _Block:
    """Buffers for ``n`` elements: the channels ``(16, n)``, the nominal direction, the Adafactor factor products
    ``(3, n)`` and the MLP's layers ``(4, n)``."""

    def __init__(self, n: int, like: torch.Tensor) -> None:
        self.channels = like.new_empty((16, n))
        self.direction = like.new_empty((n,))
        self.factor = like.new_empty((3, n))
        self.mom_factor = like.new_empty((3, n))
        self.hidden = like.new_empty((NUM_OUTPUTS, n))
        self.hidden2 = like.new_empty((NUM_OUTPUTS, n))
        self.out = like.new_empty((NUM_OUTPUTS, n))
        self.tmp = like.new_empty((n,))

    def fill(self, g, x, m, v, scale, mom_scale, *, stored: bool) -> None:
        """The block's channels in the order of ``nero_core._star._ELEMENT_ROWS`` (``g, p, m, v`` only when
        ``stored``) and its nominal direction ``mean_i(m_i) * rsqrt(v + 1e-6)``."""
        n = v.numel()
        c = self.channels[:, :n]
        shape = (3, *v.shape)
        if stored:
            c[0].view(v.shape).copy_(g)
            c[1].view(v.shape).copy_(x)
            c[2:5].view(shape).copy_(m)
            c[5].view(v.shape).copy_(v)
        rsqrt_v = c[9].view(v.shape)
        torch.add(v, 1e-6, out=rsqrt_v)
        rsqrt_v.rsqrt_()
        torch.mul(m, rsqrt_v, out=c[6:9].view(shape))
        direction = self.direction[:n]
        torch.add(c[6], c[7], out=direction)
        direction.add_(c[8]).div_(3)
        factor = _product(scale, shape, self.factor[:, :n])
        torch.mul(g, factor, out=c[10:13].view(shape))
        if mom_scale is not scale:
            factor = _product(mom_scale, shape, self.mom_factor[:, :n])
        torch.mul(m, factor, out=c[13:16].view(shape))


def _log_scale_(a: torch.Tensor) -> torch.Tensor:
    """In place: ``exp(clip(1e-3 * a, -1, 1))``."""
    return a.mul_(EXP_MULT).clamp_(-MAX_LOG_SCALE, MAX_LOG_SCALE).exp_()


def step_in_place(p: torch.Tensor, g: torch.Tensor, t: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                  row: torch.Tensor, col: torch.Tensor, w: Mapping[str, torch.Tensor], *, step_mult: Any,
                  nominal_stepsize: Any, weight_decay: Any, block_size: int) -> None:
    """Write STAR's new parameter into ``p`` (contiguous, of the state's dtype) from the accumulators already
    updated with ``g``."""
    shape = tuple(p.shape)
    scale, row_f, col_f, mom_scale = _adafactor_factors(row, col, shape, xp)
    blocks: list[Any] = _block_rows(shape, block_size) or [None]
    buffers = _Block(min(math.prod(shape), max(block_size, math.prod(shape[1:]) if shape else 1)), v)

    def fill(block, stored):
        factors = [_rows_of(f, 1, block) for f in scale]
        mom_factors = factors if mom_scale is scale else [_rows_of(f, 1, block) for f in mom_scale]
        buffers.fill(_rows_of(g, 0, block), _rows_of(p, 0, block), _rows_of(m, 1, block), _rows_of(v, 0, block),
                     factors, mom_factors, stored=stored)

    sums = torch.cat([torch.linalg.vector_norm(a.reshape(rows, -1), dim=1) for a, rows in ((g, 1), (p, 1), (m, 3),
                                                                                           (v, 1))]).square_()
    computed = torch.zeros(11, dtype=v.dtype, device=v.device)
    for block in blocks:
        fill(block, stored=False)
        n = _rows_of(v, 0, block).numel()
        computed[:10] += torch.linalg.vector_norm(buffers.channels[6:16, :n], dim=1).square_()
        computed[10] += torch.linalg.vector_norm(buffers.direction[:n]).square_()
    mean_squares = torch.cat([sums, computed]) / math.prod(shape)
    w1t = _scaled_rows(w["w1"], _ELEMENT_ROWS, mean_squares[:16], xp).T.contiguous()  # (4, 16)
    learned_scale = step_mult * mean_squares[16].sqrt()
    row_part, col_part = _factored_parts(row_f, col_f, t, w, xp)
    w2t, w3t = w["w2"].T.contiguous(), w["w3"].T.contiguous()
    decay = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)
    for block in blocks:
        fill(block, stored=True)
        pb = _rows_of(p, 0, block)
        n = pb.numel()
        hidden, hidden2, out = buffers.hidden[:, :n], buffers.hidden2[:, :n], buffers.out[:, :n]
        torch.mm(w1t, buffers.channels[:, :n], out=hidden)
        parts = hidden.view(NUM_OUTPUTS, *pb.shape)
        parts += _rows_of(row_part, 1, block)
        parts += _rows_of(col_part, 1, block)
        torch.addmm(w["b2"][:, None], w2t, hidden.clamp_(min=0.0), out=hidden2)
        torch.addmm(w["b3"][:, None], w3t, hidden2.clamp_(min=0.0), out=out)
        d, mu, nu, rho = (out[i].view(pb.shape) for i in range(NUM_OUTPUTS))
        step = d.tanh_().mul_(_log_scale_(mu)).mul_(learned_scale)
        step.add_(_log_scale_(nu).mul_(buffers.direction[:n].view(pb.shape)).mul_(nominal_stepsize))
        if decay:
            pb.mul_(_log_scale_(rho).mul_(-weight_decay).add_(1))
        pb.sub_(step)
