"""nero_torch.Nero against a peer implementation, ``pytorch_optimizer.Nero``.

The peer differs in ways that are configured away here: it adds ``eps`` to every norm (set to 0), it constrains
every tensor with ``ndim > 1`` (the model has no fan-in-1 weights, so both constrain the same tensors), and it
takes ``sigma`` as the mean row norm after its first projection where nero-core fixes 1 (the parameters start
pre-projected, so both are 1 up to rounding). Its step count is per group; every parameter here has a gradient at
every step, so the counts agree.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nero_core
import nero_torch

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")


def balanced_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 5))
    with torch.no_grad():
        params = list(model.parameters())
        for p, q in zip(params, nero_core.balanced([p.detach() for p in params])):
            p.copy_(q)
    return model


@pytest.mark.parametrize("foreach", [False, None])
def test_matches_pytorch_optimizer_nero_over_20_steps(foreach):
    ours, peers = balanced_mlp(), balanced_mlp()
    opt = nero_torch.Nero(ours.parameters(), lr=0.01, beta=0.999, foreach=foreach)
    peer = pytorch_optimizer.Nero(peers.parameters(), lr=0.01, beta=0.999, constraints=True, eps=0.0, foreach=False)
    gen = torch.Generator().manual_seed(1)
    deviation = 0.0
    for _ in range(20):
        x, y = torch.randn(16, 12, generator=gen), torch.randint(0, 5, (16,), generator=gen)
        for model, optimizer in ((ours, opt), (peers, peer)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        deviation = max(deviation, *((p - q).abs().max().item() for p, q in zip(ours.parameters(), peers.parameters())))
    assert deviation <= 1e-6
