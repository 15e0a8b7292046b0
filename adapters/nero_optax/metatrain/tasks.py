"""The meta-training task distribution: plain MLPs of several depths and widths, a small CNN, a tiny character
transformer, each drawn with a random initialisation scale and a random loss scale.

A family fixes the shapes (architecture, data set, batch) so that one compiled unroll serves every task drawn from
it; a task is a family plus a random initialisation, an initialisation scale, a loss scale and a minibatch stream.
None of these is in the held-out suite of ``examples/star_eval.py``: its MLPs are deeper or wider and run on full
28x28 MNIST, its CNN runs on CIFAR-10, its transformer on tiny Shakespeare, and one MLP uses SiLU, which no family
here does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FAMILIES", "SMOKE_FAMILIES", "CharTransformer", "Cnn", "Dataset", "Mlp", "data_dir", "families",
           "load_dataset"]

ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": jax.nn.gelu}


def data_dir() -> Path:
    """``$NERO_DATA_DIR``, else ``shared/data`` beside the repository (the test suite's convention)."""
    default = Path(__file__).resolve().parents[3].parent / "shared" / "data"
    return Path(os.environ.get("NERO_DATA_DIR", default))


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # classification: (n, features) float32, standardised; text: (n,) int32 token ids
    y: np.ndarray  # classification: (n,) int32; text: empty
    classes: int  # classes, or the vocabulary size


def _standardise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-3)


def _sklearn_text() -> str:
    """The descriptions bundled with scikit-learn's toy data sets: about 15k characters of English, no file needed."""
    from sklearn import datasets

    loaders = (datasets.load_iris, datasets.load_digits, datasets.load_wine, datasets.load_breast_cancer,
               datasets.load_diabetes, datasets.load_linnerud)
    return "".join(load().DESCR for load in loaders)


def load_dataset(name: str) -> Dataset:
    """``"mnist"`` (the 60k training images pooled to 14x14), ``"digits"`` (scikit-learn's 8x8 digits) or
    ``"sktext"`` (scikit-learn's data set descriptions as ASCII codes, a vocabulary of 128)."""
    if name == "mnist":
        with np.load(data_dir() / "mnist.npz", allow_pickle=False) as f:
            x, y = f["x_train"].astype(np.float32) / 255.0, f["y_train"]
        x = x.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)).reshape(len(x), -1)
        return Dataset(_standardise(x), y.astype(np.int32), 10)
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return Dataset(_standardise(d.data), d.target.astype(np.int32), 10)
    if name == "sktext":
        ids = np.frombuffer(_sklearn_text().encode("ascii"), np.uint8).astype(np.int32)
        return Dataset(ids, np.zeros(0, np.int32), 128)
    raise ValueError(f"unknown dataset {name!r}")


def _dense(key: Any, a: int, b: int) -> list[Any]:
    return [jax.random.normal(key, (a, b), jnp.float32) / float(np.sqrt(a)), jnp.zeros((b,), jnp.float32)]


def _xent(logits: Any, y: Any) -> Any:
    picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)


class _Classifier:
    """Minibatches of ``batch`` rows drawn with replacement from a classification data set."""

    dataset: str
    batch: int

    def sample(self, key: Any, x: Any, y: Any) -> tuple[Any, Any]:
        idx = jax.random.randint(key, (self.batch,), 0, x.shape[0])
        return x[idx], y[idx]


@dataclass(frozen=True)
class Mlp(_Classifier):
    """A plain MLP classifier: ``dataset``, hidden ``widths``, ``activation``, minibatch size."""

    dataset: str
    widths: tuple[int, ...]
    activation: str
    batch: int = 64

    @property
    def name(self) -> str:
        return f"{self.dataset}-mlp{'x'.join(map(str, self.widths))}-{self.activation}"

    def init(self, key: Any, features: int, classes: int) -> tuple[Any, ...]:
        """Kernels ``(in, out)`` with variance ``1/in``, zero biases."""
        sizes = (features, *self.widths, classes)
        params: list[Any] = []
        for k, (a, b) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
            params += _dense(k, a, b)
        return tuple(params)

    def loss(self, params: tuple[Any, ...], x: Any, y: Any) -> Any:
        act = ACTIVATIONS[self.activation]
        h = x
        for i in range(0, len(params) - 2, 2):
            h = act(h @ params[i] + params[i + 1])
        return _xent(h @ params[-2] + params[-1], y)


@dataclass(frozen=True)
class Cnn(_Classifier):
    """Two 3x3 convolutions (ReLU, 2x2 average pooling after each) and a linear head, on square single-channel
    images given as flat rows of ``side * side`` pixels."""

    dataset: str
    channels: tuple[int, int]
    side: int
    batch: int = 32

    @property
    def name(self) -> str:
        return f"{self.dataset}-cnn{'x'.join(map(str, self.channels))}"

    def init(self, key: Any, features: int, classes: int) -> tuple[Any, ...]:
        c1, c2 = self.channels
        k = jax.random.split(key, 3)
        pooled = (self.side // 4) ** 2 * c2
        return (jax.random.normal(k[0], (3, 3, 1, c1), jnp.float32) / 3.0, jnp.zeros((c1,), jnp.float32),
                jax.random.normal(k[1], (3, 3, c1, c2), jnp.float32) / float(np.sqrt(9 * c1)),
                jnp.zeros((c2,), jnp.float32),
                *_dense(k[2], pooled, classes))

    def loss(self, params: tuple[Any, ...], x: Any, y: Any) -> Any:
        h = x.reshape(x.shape[0], self.side, self.side, 1)
        for w, b in (params[0:2], params[2:4]):
            h = jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = jax.nn.relu(h + b)
            h = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
        return _xent(h.reshape(h.shape[0], -1) @ params[4] + params[5], y)


@dataclass(frozen=True)
class CharTransformer:
    """A pre-norm causal transformer (``layers`` blocks, width ``d``, ``heads`` heads, context ``ctx``) predicting the
    next character of a text."""

    dataset: str
    d: int
    layers: int
    ctx: int
    heads: int = 2
    batch: int = 16

    @property
    def name(self) -> str:
        return f"{self.dataset}-transformer{self.layers}x{self.d}"

    def init(self, key: Any, features: int, classes: int) -> tuple[Any, ...]:
        keys = iter(jax.random.split(key, 3 + 4 * self.layers))
        d = self.d
        params = [jax.random.normal(next(keys), (classes, d), jnp.float32) * 0.1,
                  jax.random.normal(next(keys), (self.ctx, d), jnp.float32) * 0.1]
        for _ in range(self.layers):
            params += [jnp.ones((d,), jnp.float32), _dense(next(keys), d, 3 * d)[0], _dense(next(keys), d, d)[0],
                       jnp.ones((d,), jnp.float32), *_dense(next(keys), d, 4 * d), *_dense(next(keys), 4 * d, d)]
        return tuple(params + [jnp.ones((d,), jnp.float32), *_dense(next(keys), d, classes)])

    def sample(self, key: Any, x: Any, y: Any) -> tuple[Any, Any]:
        start = jax.random.randint(key, (self.batch,), 0, x.shape[0] - self.ctx - 1)
        window = x[start[:, None] + jnp.arange(self.ctx + 1)]
        return window[:, :-1], window[:, 1:]

    def loss(self, params: tuple[Any, ...], x: Any, y: Any) -> Any:
        def norm(h: Any, gain: Any) -> Any:
            return gain * (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5)

        d, heads = self.d, self.heads
        h = params[0][x] + params[1]
        mask = jnp.tril(jnp.ones((self.ctx, self.ctx), bool))
        for i in range(self.layers):
            ln1, qkv, proj, ln2, fc, fcb, fc2, fc2b = params[2 + 8 * i: 10 + 8 * i]
            q, k, v = (a.reshape(*a.shape[:-1], heads, d // heads) for a in jnp.split(norm(h, ln1) @ qkv, 3, -1))
            att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads)
            att = jax.nn.softmax(jnp.where(mask, att, -1e9), -1)
            h = h + jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(h.shape) @ proj
            h = h + jax.nn.gelu(norm(h, ln2) @ fc + fcb) @ fc2 + fc2b
        return _xent(norm(h, params[-3]) @ params[-2] + params[-1], y)


# Depths 2 to 9 linear layers, widths 32 to 128, three activations, a CNN and a transformer.
FAMILIES = (
    Mlp("mnist", (64,), "relu"),
    Mlp("mnist", (128, 128), "relu"),
    Mlp("mnist", (32, 32, 32), "tanh"),
    Mlp("mnist", (64,) * 5, "relu"),
    Mlp("mnist", (32,) * 8, "relu"),
    Mlp("digits", (64,) * 7, "gelu"),
    Mlp("digits", (128, 128), "tanh"),
    Cnn("mnist", (8, 16), 14),
    CharTransformer("sktext", d=32, layers=1, ctx=32),
)

# Two tiny families: a CI run of the whole meta-training loop in seconds.
SMOKE_FAMILIES = (Mlp("digits", (8,), "relu", batch=8), Mlp("digits", (8, 8), "tanh", batch=8))


def families(name: str) -> tuple[Any, ...]:
    """A named family set: ``"default"`` (:data:`FAMILIES`) or ``"smoke"`` (:data:`SMOKE_FAMILIES`)."""
    sets = {"default": FAMILIES, "smoke": SMOKE_FAMILIES}
    if name not in sets:
        raise ValueError(f"unknown family set {name!r}; choose from {sorted(sets)}")
    return sets[name]
