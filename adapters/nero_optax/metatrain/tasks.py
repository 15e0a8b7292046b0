"""The meta-training task distribution: small MLP classifiers on MNIST (14x14, average-pooled) and sklearn digits.

A task family fixes the shapes (dataset, hidden widths, activation) so that one compiled unroll serves every task
drawn from it; a task is a family plus a random initialisation and a minibatch stream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FAMILIES", "Dataset", "Family", "data_dir", "load_dataset"]

ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": jax.nn.gelu}


def data_dir() -> Path:
    """``$NERO_DATA_DIR``, else ``shared/data`` beside the repository (the test suite's convention)."""
    default = Path(__file__).resolve().parents[3].parent / "shared" / "data"
    return Path(os.environ.get("NERO_DATA_DIR", default))


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # (n, features) float32, standardised
    y: np.ndarray  # (n,) int32
    classes: int


def _standardise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-3)


def load_dataset(name: str) -> Dataset:
    """``"mnist"`` (the 60k training images pooled to 14x14) or ``"digits"`` (sklearn's bundled 8x8 digits)."""
    if name == "mnist":
        with np.load(data_dir() / "mnist.npz", allow_pickle=False) as f:
            x, y = f["x_train"].astype(np.float32) / 255.0, f["y_train"]
        x = x.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)).reshape(len(x), -1)
        return Dataset(_standardise(x), y.astype(np.int32), 10)
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return Dataset(_standardise(d.data), d.target.astype(np.int32), 10)
    raise ValueError(f"unknown dataset {name!r}")


@dataclass(frozen=True)
class Family:
    """An MLP classifier family: ``dataset``, hidden ``widths``, ``activation``, minibatch size."""

    dataset: str
    widths: tuple[int, ...]
    activation: str
    batch: int = 64

    @property
    def name(self) -> str:
        return f"{self.dataset}-{'x'.join(map(str, self.widths))}-{self.activation}"

    def init(self, key: Any, features: int, classes: int) -> tuple[Any, ...]:
        """Kernels ``(in, out)`` with variance ``1/in``, zero biases."""
        sizes = (features, *self.widths, classes)
        params = []
        for k, (a, b) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
            params += [jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a), jnp.zeros((b,), jnp.float32)]
        return tuple(params)

    def loss(self, params: tuple[Any, ...], x: Any, y: Any) -> Any:
        act = ACTIVATIONS[self.activation]
        h = x
        for i in range(0, len(params) - 2, 2):
            h = act(h @ params[i] + params[i + 1])
        logits = h @ params[-2] + params[-1]
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0])


# Several widths, depths and activations on both datasets.
FAMILIES = (
    Family("mnist", (32,), "relu"),
    Family("mnist", (64, 32), "tanh"),
    Family("mnist", (16,), "gelu"),
    Family("digits", (32,), "gelu"),
    Family("digits", (16, 16), "relu"),
    Family("digits", (64,), "tanh"),
)
