"""Evaluate the shipped STAR meta-parameters on held-out tasks, against Adam and the baseline without the nominal term.

Tasks (none of them in the meta-training distribution): a small CNN on a CIFAR-10 subset, a character-level
transformer on tiny Shakespeare, and an MNIST MLP of a new width trained for 10x the meta-training horizon.
Optimizers: STAR (``star_v1``), the same architecture meta-trained without the nominal term (``star_nonom_v1``,
the small_fc_lopt baseline), AdamAggMo (STAR's nominal term alone), Adam at 1e-3 and Adam at its best learning
rate from a grid (chosen per task by the mean final training loss over seeds). Every run of a group is one
``vmap`` under one ``jit``; all optimizers of a seed see the same minibatches.

    python examples/star_eval.py            # the evaluation, three seeds (about 5 minutes on 2 cores)
    python examples/star_eval.py --quick    # CI smoke run, well under a minute
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))  # runnable without installing

from nero_core._star import load_star_config, load_star_params  # noqa: E402
from nero_optax.star import star  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NERO_DATA_DIR", ROOT.parent / "shared" / "data"))
ADAM_LRS = (1e-3, 3e-3, 1e-2)


@dataclass
class Task:
    name: str
    steps: int
    init: Callable[[Any], Any]                   # key -> params
    loss: Callable[[Any, Any, Any], Any]         # params, x, y -> scalar
    batch: Callable[[Any], tuple[Any, Any]]      # key -> (x, y)
    heldout: Callable[[Any], dict[str, Any]]     # params -> {metric: value}


def _dense(key, a, b):
    return jax.random.normal(key, (a, b)) / np.sqrt(a), jnp.zeros((b,))


def _xent(logits, y):
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[..., None], -1)[..., 0])


def cifar_cnn(n_train: int, n_test: int, steps: int, batch: int) -> Task:
    from PIL import Image

    with np.load(DATA / "cifar10_jpeg.npz", allow_pickle=False) as f:
        def decode(split, n):
            jpeg, off, labels = f[f"{split}_jpeg"], f[f"{split}_offsets"], f[f"{split}_labels"]
            idx = np.random.default_rng(0).choice(len(labels), n, replace=False)
            imgs = [np.asarray(Image.open(io.BytesIO(jpeg[off[i]:off[i + 1]].tobytes())).convert("RGB")) for i in idx]
            x = (np.stack(imgs).astype(np.float32) / 255 - [0.4913, 0.4821, 0.4465]) / [0.2452, 0.2428, 0.2606]
            return jnp.asarray(x, jnp.float32), jnp.asarray(labels[idx].astype(np.int32))

        xtr, ytr = decode("train", n_train)
        xte, yte = decode("test", n_test)

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def pool(x):
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4

    def init(key):
        k = jax.random.split(key, 3)
        w3, b3 = _dense(k[2], 8 * 8 * 32, 10)
        return {"c1": jax.random.normal(k[0], (3, 3, 3, 16)) / np.sqrt(27), "cb1": jnp.zeros(16),
                "c2": jax.random.normal(k[1], (3, 3, 16, 32)) / np.sqrt(144), "cb2": jnp.zeros(32),
                "w": w3, "b": b3}

    def logits(p, x):
        h = pool(jax.nn.relu(conv(x, p["c1"]) + p["cb1"]))
        h = pool(jax.nn.relu(conv(h, p["c2"]) + p["cb2"]))
        return h.reshape(h.shape[0], -1) @ p["w"] + p["b"]

    def sample(key):
        i = jax.random.randint(key, (batch,), 0, xtr.shape[0])
        return xtr[i], ytr[i]

    def heldout(p):
        out = logits(p, xte)
        return {"test_loss": _xent(out, yte), "test_acc": jnp.mean(jnp.argmax(out, -1) == yte)}

    return Task("cifar10_cnn", steps, init, lambda p, x, y: _xent(logits(p, x), y), sample, heldout)


def char_transformer(steps: int, batch: int, ctx: int = 32, d: int = 32, layers: int = 2, heads: int = 4) -> Task:
    text = (DATA / "tinyshakespeare.txt").read_text()
    raw = np.frombuffer(text.encode("ascii"), np.uint8)
    chars = np.unique(raw)
    lookup = np.zeros(256, np.int32)
    lookup[chars] = np.arange(len(chars))
    ids = jnp.asarray(lookup[raw])
    split = int(0.9 * len(ids))
    train, val = ids[:split], ids[split:]
    vocab = len(chars)

    def init(key):
        k = iter(jax.random.split(key, 4 + 4 * layers))
        p = {"emb": jax.random.normal(next(k), (vocab, d)) * 0.1, "pos": jax.random.normal(next(k), (ctx, d)) * 0.1,
             "lnf": jnp.ones(d)}
        p["out"], p["out_b"] = _dense(next(k), d, vocab)
        for i in range(layers):
            p[f"qkv{i}"], _ = _dense(next(k), d, 3 * d)
            p[f"proj{i}"], _ = _dense(next(k), d, d)
            p[f"fc{i}"], p[f"fcb{i}"] = _dense(next(k), d, 4 * d)
            p[f"fc2{i}"], p[f"fc2b{i}"] = _dense(next(k), 4 * d, d)
            p[f"ln1{i}"], p[f"ln2{i}"] = jnp.ones(d), jnp.ones(d)
        return p

    def norm(x, g):
        return g * (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)

    def logits(p, x):
        h = p["emb"][x] + p["pos"]
        mask = jnp.tril(jnp.ones((ctx, ctx), bool))
        for i in range(layers):
            q, k, v = jnp.split(norm(h, p[f"ln1{i}"]) @ p[f"qkv{i}"], 3, -1)
            q, k, v = (a.reshape(*a.shape[:-1], heads, d // heads) for a in (q, k, v))
            att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads)
            att = jax.nn.softmax(jnp.where(mask, att, -1e9), -1)
            h = h + jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(h.shape) @ p[f"proj{i}"]
            h = h + jax.nn.gelu(norm(h, p[f"ln2{i}"]) @ p[f"fc{i}"] + p[f"fcb{i}"]) @ p[f"fc2{i}"] + p[f"fc2b{i}"]
        return norm(h, p["lnf"]) @ p["out"] + p["out_b"]

    def windows(data, key, n):
        start = jax.random.randint(key, (n,), 0, data.shape[0] - ctx - 1)
        idx = start[:, None] + jnp.arange(ctx + 1)
        w = data[idx]
        return w[:, :-1], w[:, 1:]

    def heldout(p):
        x, y = windows(val, jax.random.PRNGKey(123), 256)
        return {"val_loss": _xent(logits(p, x), y)}

    return Task("shakespeare_char_transformer", steps, init, lambda p, x, y: _xent(logits(p, x), y),
                lambda key: windows(train, key, batch), heldout)


def mnist_mlp(steps: int, batch: int, widths=(128, 128)) -> Task:
    with np.load(DATA / "mnist.npz", allow_pickle=False) as f:
        def prep(x):
            x = x.astype(np.float32).reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)).reshape(len(x), -1) / 255
            return x
        xtr, ytr, xte, yte = prep(f["x_train"]), f["y_train"], prep(f["x_test"]), f["y_test"]
    mean, std = xtr.mean(0), xtr.std(0) + 1e-3
    xtr, xte = jnp.asarray((xtr - mean) / std), jnp.asarray((xte - mean) / std)
    ytr, yte = jnp.asarray(ytr.astype(np.int32)), jnp.asarray(yte.astype(np.int32))
    sizes = (196, *widths, 10)

    def init(key):
        p = {}
        for i, (k, (a, b)) in enumerate(zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:]))):
            p[f"w{i}"], p[f"b{i}"] = _dense(k, a, b)
        return p

    def logits(p, x):
        for i in range(len(sizes) - 2):
            x = jax.nn.relu(x @ p[f"w{i}"] + p[f"b{i}"])
        return x @ p[f"w{len(sizes) - 2}"] + p[f"b{len(sizes) - 2}"]

    def sample(key):
        i = jax.random.randint(key, (batch,), 0, xtr.shape[0])
        return xtr[i], ytr[i]

    def heldout(p):
        out = logits(p, xte)
        return {"test_loss": _xent(out, yte), "test_acc": jnp.mean(jnp.argmax(out, -1) == yte)}

    name = f"mnist_mlp_{'x'.join(map(str, widths))}_{steps}steps"
    return Task(name, steps, init, lambda p, x, y: _xent(logits(p, x), y), sample, heldout)


def run_group(task: Task, make_tx: Callable[[Any], optax.GradientTransformation], hparams: Any, seeds: Any):
    """Train one run per (hparams[i], seeds[i]) in a single vmapped, jitted scan; returns losses and held-out."""

    def train(hp, seed):
        tx = make_tx(hp)
        params = task.init(jax.random.PRNGKey(seed))

        def one(carry, key):
            params, state = carry
            loss, grads = jax.value_and_grad(task.loss)(params, *task.batch(key))
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        keys = jax.random.split(jax.random.PRNGKey(seed + 10_000), task.steps)
        (params, _), losses = jax.lax.scan(one, (params, tx.init(params)), keys)
        return losses, task.heldout(params)

    losses, held = jax.jit(jax.vmap(train))(hparams, seeds)
    return np.asarray(losses), {k: np.asarray(v) for k, v in held.items()}


def summarise(losses: np.ndarray, held: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per run: final train loss (mean of the last 10% of steps), initial loss, divergence, held-out metrics."""
    tail = max(1, losses.shape[-1] // 10)
    final = losses[..., -tail:].mean(-1)
    initial = losses[..., :5].mean(-1)
    diverged = ~np.isfinite(final) | (final > initial)
    out = {"final_train_loss": final.tolist(), "initial_train_loss": initial.tolist(), "diverged": diverged.tolist()}
    out.update({k: v.tolist() for k, v in held.items()})
    return out


def evaluate(task: Task, seeds: list[int]) -> dict[str, Any]:
    n = len(seeds)
    results: dict[str, Any] = {}
    # STAR, the no-nominal baseline and AdamAggMo (STAR with step_mult 0) share one compiled vmap.
    star_sets = {
        "star": (load_star_params("star_v1"), 1e-3, load_star_config("star_v1")["rule"]["nominal_stepsize"]),
        "star_nonom": (load_star_params("star_nonom_v1"), 1e-3, 0.0),
        "adam_aggmo": (load_star_params("star_v1"), 0.0, 1e-3),
    }
    names = list(star_sets)
    meta = {k: jnp.asarray(np.repeat(np.stack([star_sets[m][0][k] for m in names]), n, 0), jnp.float32)
            for k in star_sets["star"][0]}
    step_mult = jnp.asarray(np.repeat([star_sets[m][1] for m in names], n), jnp.float32)
    nominal = jnp.asarray(np.repeat([star_sets[m][2] for m in names], n), jnp.float32)
    t0 = time.time()
    losses, held = run_group(task, lambda hp: star(hp[0], step_mult=hp[1], nominal_stepsize=hp[2]),
                             (meta, step_mult, nominal), jnp.asarray(np.tile(seeds, len(names))))
    for i, name in enumerate(names):
        sl = slice(i * n, (i + 1) * n)
        results[name] = summarise(losses[sl], {k: v[sl] for k, v in held.items()})
    lrs = jnp.asarray(np.repeat(ADAM_LRS, n), jnp.float32)
    losses, held = run_group(task, lambda lr: optax.adam(lr), lrs, jnp.asarray(np.tile(seeds, len(ADAM_LRS))))
    adam = {}
    for i, lr in enumerate(ADAM_LRS):
        sl = slice(i * n, (i + 1) * n)
        adam[lr] = summarise(losses[sl], {k: v[sl] for k, v in held.items()})
    finite = {lr: np.mean(r["final_train_loss"]) for lr, r in adam.items() if not any(r["diverged"])}
    best = min(finite or {lr: 0.0 for lr in ADAM_LRS}, key=lambda lr: finite.get(lr, np.inf))
    results["adam_1e-3"] = adam[1e-3]
    results["adam_best"] = dict(adam[best], lr=best)
    results["adam_grid"] = {str(lr): float(np.mean(r["final_train_loss"])) for lr, r in adam.items()}
    results["wall_seconds"] = round(time.time() - t0, 1)
    return results


def table(all_results: dict[str, Any]) -> str:
    rows = ["| task | optimizer | final train loss | held-out | diverged runs |", "|---|---|---|---|---|"]
    for task, res in all_results["tasks"].items():
        for opt in ("star", "star_nonom", "adam_aggmo", "adam_1e-3", "adam_best"):
            r = res[opt]
            metric = next(k for k in ("test_acc", "val_loss") if k in r)
            label = f"adam_best (lr {r['lr']:g})" if opt == "adam_best" else opt
            rows.append(f"| {task} | {label} | {np.mean(r['final_train_loss']):.3f} ± "
                        f"{np.std(r['final_train_loss']):.3f} | {metric} {np.mean(r[metric]):.3f} | "
                        f"{sum(r['diverged'])}/{len(r['diverged'])} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and one seed: a CI smoke run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "examples" / "results" / "star" / "eval.json")
    args = ap.parse_args(argv)
    horizon = load_star_config("star_v1")["config"]["horizon"]
    if args.quick:
        seeds = [0]
        tasks = [cifar_cnn(64, 64, 8, 16), char_transformer(8, 4, ctx=16, d=16, layers=1), mnist_mlp(10, 16, (16,))]
    else:
        seeds = list(range(args.seeds))
        tasks = [mnist_mlp(10 * horizon, 32, (64, 64)), cifar_cnn(2000, 1000, 150, 16), char_transformer(150, 8)]
    start = time.time()
    results = {"quick": args.quick, "seeds": seeds, "meta_training_horizon": horizon,
               "meta_params": load_star_config("star_v1")["label"], "tasks": {}}
    for task in tasks:
        results["tasks"][task.name] = evaluate(task, seeds)
        print(f"{task.name}: {results['tasks'][task.name]['wall_seconds']} s", flush=True)
        results["wall_seconds"] = round(time.time() - start, 1)
        results["table"] = table(results)
        if not args.quick:  # written after every task, so a cut-short run still leaves its finished tasks
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")
            args.out.with_suffix(".md").write_text(results["table"] + "\n")
    print(results["table"])


if __name__ == "__main__":
    main()
