"""The small models the studies train. Plain PyTorch modules, default initialisation unless stated."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "ActorCritic", "CentredWeightNormLinear", "CharTransformer", "Discriminator", "Generator", "ScaledReLU", "cnn", "mlp",
]


def mlp(inputs: int, width: int, outputs: int, *, depth: int = 3, linear=nn.Linear,
        activation: Callable[[], nn.Module] = nn.ReLU) -> nn.Sequential:
    """``depth`` linear layers with ``activation`` (ReLU) between them; no normalisation, no skips."""
    sizes = [inputs] + [width] * (depth - 1) + [outputs]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [linear(a, b)] + ([activation()] if i < depth - 1 else [])
    return nn.Sequential(*layers)


class ScaledReLU(nn.Module):
    """``sqrt(2) * relu(x)``: keeps the signal's scale through depth under orthogonal weights (AGD's network)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * 2.0**0.5


def cnn(channels: tuple[int, ...] = (16, 32, 64), classes: int = 10, in_channels: int = 3, size: int = 32):
    """Conv3x3-ReLU-MaxPool blocks, then one linear classifier; no batch norm."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip((in_channels,) + channels[:-1], channels):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    side = size // 2 ** len(channels)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels[-1] * side * side, classes))


class CentredWeightNormLinear(nn.Module):
    """``y = g * (V - mean_row V) / |V - mean_row V| x + b``: the effective rows are balanced whatever ``V``'s
    scale, so the raw weights ``V ~ N(0, sigma^2)`` carry a free scale that the loss cannot see."""

    def __init__(self, inputs: int, outputs: int, sigma: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(sigma * torch.randn(outputs, inputs))
        self.gain = nn.Parameter(torch.ones(outputs))
        self.bias = nn.Parameter(torch.zeros(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.weight - self.weight.mean(dim=1, keepdim=True)
        w = v / v.norm(dim=1, keepdim=True)
        return nn.functional.linear(x, self.gain[:, None] * w, self.bias)


class CharTransformer(nn.Module):
    """A small pre-norm causal transformer over characters."""

    def __init__(self, vocabulary: int, context: int, width: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.position = nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        h = self.embed(ids) + self.position(torch.arange(n, device=ids.device))
        h = self.blocks(h, mask=self.mask[:n, :n], is_causal=True)
        return self.head(self.norm(h))


class Generator(nn.Module):
    """Class-conditional MLP generator: (noise, one-hot class) -> a 784-pixel image in [-1, 1]."""

    def __init__(self, noise: int = 64, width: int = 256, classes: int = 10, pixels: int = 784):
        super().__init__()
        self.noise, self.classes = noise, classes
        self.net = nn.Sequential(mlp(noise + classes, width, pixels, depth=3), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, nn.functional.one_hot(labels, self.classes).float()], dim=1))


class Discriminator(nn.Module):
    """Class-conditional MLP discriminator with a projection head (Miyato & Koyama, 2018):
    ``D(x, y) = w . phi(x) + e_y . phi(x)``, where ``phi`` is a two-layer LeakyReLU MLP and ``e_y`` the embedding of
    class ``y``. (A discriminator that reads the class as 10 one-hot inputs beside 784 pixels learned no
    conditioning within 4000 steps with Adam; the projection makes the class a first-class part of its score.)"""

    def __init__(self, width: int = 256, classes: int = 10, pixels: int = 784):
        super().__init__()
        self.net = mlp(pixels, width, 1, depth=3, activation=lambda: nn.LeakyReLU(0.2))  # phi, then w
        self.embed = nn.Embedding(classes, width)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.net[:-1](x)
        return self.net[-1](h).squeeze(1) + (self.embed(labels) * h).sum(1)


class ActorCritic(nn.Module):
    """Separate MLPs for the policy logits and the state value."""

    def __init__(self, observations: int, actions: int, width: int = 64):
        super().__init__()
        self.policy = mlp(observations, width, actions, depth=3, linear=nn.Linear)
        self.value = mlp(observations, width, 1, depth=3)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy(obs), self.value(obs).squeeze(-1)
