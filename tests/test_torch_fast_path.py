"""nero_torch's fast paths against the core rule (``foreach=False`` calls nero_core.nero on the tensors).

Each model trains for 50 steps from the same start on the same batches; after every step the parameters of
the fast path must stay within 1e-6 (float32) / 1e-12 (float64) of the reference path's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nero_torch

STEPS = 50
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 16, context: int = 8) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        # No biases: the key bias has an exactly-zero gradient (softmax ignores it), whose rounding noise
        # Nero's normalised step would turn into O(lr) moves that differ between any two exact implementations.
        self.block = nn.TransformerEncoderLayer(
            d, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True, bias=False
        )
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        return self.norm(self.block(h)) @ self.tok.weight.T  # tied head


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5))


def cnn() -> nn.Module:
    # No bias before BatchNorm: its gradient is rounding noise, which Nero's normalised step would amplify.
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.ConvTranspose2d(6, 4, 2, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 12 * 12, 5),
    )


MODELS = {
    "mlp": (mlp, lambda g: torch.randn(16, 12, generator=g), 5),
    "cnn": (cnn, lambda g: torch.randn(8, 3, 8, 8, generator=g), 5),
    "transformer": (TinyTransformer, lambda g: torch.randint(0, 32, (4, 8), generator=g), 32),
}


def train(name: str, dtype: torch.dtype, **options) -> list[list[torch.Tensor]]:
    make, inputs, classes = MODELS[name]
    torch.manual_seed(0)
    model = make().to(dtype)
    opt = nero_torch.Nero(nero_torch.param_groups(model), **options)
    gen = torch.Generator().manual_seed(1)
    history = []
    for _ in range(STEPS):
        x = inputs(gen)
        x = x.to(dtype) if x.is_floating_point() else x
        out = model(x).reshape(-1, classes)
        target = torch.randint(0, classes, (out.shape[0],), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(out, target).backward()
        opt.step()
        history.append([p.detach().clone() for p in model.parameters()])
    return history


def max_deviation(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> float:
    return max((x - y).abs().max().item() for step_a, step_b in zip(a, b) for x, y in zip(step_a, step_b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("model", list(MODELS))
def test_fast_path_matches_core_rule(model, dtype):
    assert max_deviation(train(model, dtype), train(model, dtype, foreach=False)) <= TOLERANCE[dtype]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_compiled_kernel_matches_core_rule(dtype):
    assert max_deviation(train("cnn", dtype, fused=True), train("cnn", dtype, foreach=False)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("foreach", [False, None])
def test_bfloat16_parameters_keep_float32_state_and_track_float32(foreach):
    torch.manual_seed(0)
    model = mlp()
    low = mlp().to(torch.bfloat16)
    low.load_state_dict(model.state_dict())
    opts = [nero_torch.Nero(m.parameters(), foreach=foreach) for m in (model, low)]
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    for _ in range(10):
        for m, opt in zip((model, low), opts):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x.to(m[0].weight.dtype)).float(), y).backward()
            opt.step()
    assert all(s["v"].dtype == torch.float32 and s["sigma"].dtype == torch.float32 for s in opts[1].state.values())
    for p, q in zip(model.parameters(), low.parameters()):
        assert q.dtype == torch.bfloat16
        torch.testing.assert_close(q.float(), p, atol=0.05, rtol=0.05)


def test_maximize_ascends_exactly_as_minimizing_the_negative():
    def run(maximize: bool, foreach):
        torch.manual_seed(0)
        model = mlp()
        opt = nero_torch.Nero(model.parameters(), maximize=maximize, foreach=foreach)
        x = torch.randn(16, 12)
        for _ in range(5):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            (-loss if maximize else loss).backward()
            opt.step()
        return [p.detach() for p in model.parameters()]

    for foreach in (False, None):
        for a, b in zip(run(True, foreach), run(False, foreach)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
