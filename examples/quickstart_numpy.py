"""Train a small MLP on scikit-learn's bundled digits with Nero, in plain NumPy.

    python examples/quickstart_numpy.py

The model and its backward pass are a few lines of NumPy; the optimiser is nero_core's pure rule.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import nero_core


def forward(params, x):
    w1, b1, w2, b2 = params
    h = np.maximum(x @ w1.T + b1, 0.0)
    return h, h @ w2.T + b2


def loss_and_grads(params, x, y):
    w1, b1, w2, b2 = params
    h, logits = forward(params, x)
    logits = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    loss = -np.log(prob[np.arange(len(y)), y]).mean()
    d_logits = (prob - np.eye(10)[y]) / len(y)
    d_h = (d_logits @ w2) * (h > 0)
    return loss, [d_h.T @ x, d_h.sum(0), d_logits.T @ h, d_logits.sum(0)]


def main(epochs: int = 30, batch: int = 64, seed: int = 0) -> float:
    digits = load_digits()
    x = digits.data / 16.0
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=seed)
    rng = np.random.default_rng(seed)
    # torch layout: weights are (out, in), so the neuron axis is 0 (the default).
    params = [rng.normal(size=(128, 64)), np.zeros(128), rng.normal(size=(10, 128)), np.zeros(10)]
    opt = nero_core.nero(lr=0.01)
    state = opt.init(params)
    for epoch in range(epochs):
        order = rng.permutation(len(x_train))
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            loss, grads = loss_and_grads(params, x_train[idx], y_train[idx])
            params, state = opt.update(grads, state, params)
        if epoch % 10 == 9 or epoch == epochs - 1:
            accuracy = (forward(params, x_test)[1].argmax(1) == y_test).mean()
            print(f"epoch {epoch + 1:3d}  train loss {loss:.4f}  test accuracy {accuracy:.3f}")
    return float(accuracy)


if __name__ == "__main__":
    main()
