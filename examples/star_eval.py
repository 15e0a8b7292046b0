"""The held-out suite that decides whether STAR meta-parameters ship: tasks outside the meta-training distribution.

Tasks (``adapters/nero_optax/metatrain/tasks.py`` meta-trains on MLPs of 2 to 9 layers and 32 to 128 units with
ReLU, tanh and GELU on 14x14 MNIST and 8x8 digits, a CNN on 14x14 MNIST and a one-layer transformer on
scikit-learn's data set descriptions, for 200 steps):

* ``mnist_mlp3x192``, ``mnist_mlp6x192``: full 28x28 MNIST, ReLU MLPs of 3 and 6 linear layers of width 192 (the
  issue's failing nets), batch 128;
* ``mnist_mlp12x128``: deeper than any meta-training MLP; ``mnist_mlp2x1024``: wider; ``mnist_mlp4x256_silu``: an
  activation no meta-training task uses;
* ``cifar10_cnn``: three 3x3 convolutions (16, 32, 64 channels, max pooling) on a 10k-image CIFAR-10 subset;
* ``shakespeare_transformer``: a two-layer, 64-wide character transformer on tiny Shakespeare.

Every task runs for 10 times the meta-training horizon (2000 steps) from 3 seeds. Optimizers: STAR (the shipped
``star_*`` set), the no-nominal baseline (the same MLP meta-trained with ``nominal_stepsize=0``), AdamAggMo alone
(STAR with a zero output layer), Adam at 1e-3 and Adam at its best learning rate of a grid (chosen per task by the
mean final training loss). The runs of one optimizer are one ``vmap`` under one ``jit`` (the CNN's a ``lax.map``:
XLA's CPU backend ran its vmapped convolutions 1.2x slower than one run after another); every optimizer of a seed
sees the same minibatches.

A task's results are written as soon as it finishes (``--out``), and a rerun skips the tasks already there, so an
interrupted run resumes; a task run before the no-nominal set existed gets that column added (its other runs kept).
Processes may share the suite (``--tasks``, one share each) and one ``--out``: each writes its tasks under a lock,
beside the others'. The verdict (the shipping criteria of issue 23) is computed from the table:
STAR never diverges, is never at chance where Adam at 1e-3 trains, and is within 2 points of accuracy (or 5% of
the loss, for the transformer) of Adam at 1e-3 on the majority of tasks.

    python examples/star_eval.py                   # the suite (about 1.5 CPU hours)
    python examples/star_eval.py --quick           # CI smoke run: tiny tasks, one seed, seconds
    python examples/star_eval.py --meta star_v2    # a named parameter set (default: the shipped default)
    python examples/star_eval.py --steps 1000      # a shorter horizon (recorded in the results)
    python examples/star_eval.py --tasks cifar10_cnn,shakespeare_transformer   # one process's share
    python examples/star_eval.py --optimizers star --out ...  # STAR alone (e.g. another set or rule, beside a
                                                              # full record's baselines: same seeds, same batches)

Without a no-nominal set ``star_nonom_<tag>`` beside ``star_<tag>``, that column is left out (recorded as such).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))  # runnable without installing

from nero_core._star import DEFAULT_PARAMS, load_star_config, load_star_params  # noqa: E402
from nero_optax.star import star  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NERO_DATA_DIR", ROOT.parent / "shared" / "data"))
ADAM_LRS = (3e-4, 1e-3, 3e-3, 1e-2)
OPTIMIZERS = ("star", "star_nonom", "adam_aggmo", "adam_1e-3", "adam_best")
RUNNABLE = ("star", "star_nonom", "adam_aggmo", "adam")  # what --optimizers picks from (adam: the rate grid)
SEEDS = 3
ACCURACY_MARGIN, LOSS_MARGIN = 0.02, 0.05  # the shipping criteria's "within 2 points (or 5% of the loss)"


@dataclass
class Task:
    name: str
    steps: int
    init: Callable[[Any], Any]                   # key -> params
    loss: Callable[[Any, Any, Any], Any]         # params, x, y -> scalar
    batch: Callable[[Any], tuple[Any, Any]]      # key -> (x, y)
    heldout: Callable[[Any], dict[str, Any]]     # params -> {metric: value}
    chance: float                                # the loss of a uniform prediction
    vmapped: bool = True                         # runs side by side (False: one after another, see run_group)


def _dense(key, a, b):
    return jax.random.normal(key, (a, b)) / float(np.sqrt(a)), jnp.zeros((b,))


def _xent(logits, y):
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[..., None], -1)[..., 0])


def _classifier(name, steps, batch, init, logits, xtr, ytr, xte, yte) -> Task:
    def sample(key):
        i = jax.random.randint(key, (batch,), 0, xtr.shape[0])
        return xtr[i], ytr[i]

    def heldout(p):
        out = logits(p, xte)
        return {"test_loss": _xent(out, yte), "test_acc": jnp.mean(jnp.argmax(out, -1) == yte)}

    return Task(name, steps, init, lambda p, x, y: _xent(logits(p, x), y), sample, heldout, float(np.log(10)))


def mnist_mlp(steps: int, batch: int, depth: int, width: int, activation: str = "relu", n_test: int = 10000) -> Task:
    """Full 28x28 MNIST, standardised as torchvision does; ``depth`` linear layers."""
    with np.load(DATA / "mnist.npz", allow_pickle=False) as f:
        prep = lambda x: jnp.asarray((x.reshape(len(x), -1) / 255.0 - 0.1307) / 0.3081, jnp.float32)  # noqa: E731
        xtr, ytr = prep(f["x_train"]), jnp.asarray(f["y_train"].astype(np.int32))
        xte, yte = prep(f["x_test"][:n_test]), jnp.asarray(f["y_test"][:n_test].astype(np.int32))
    sizes = (784,) + (width,) * (depth - 1) + (10,)
    act = {"relu": jax.nn.relu, "silu": jax.nn.silu}[activation]

    def init(key):
        return [_dense(k, a, b) for k, (a, b) in zip(jax.random.split(key, depth), zip(sizes[:-1], sizes[1:]))]

    def logits(p, x):
        for w, b in p[:-1]:
            x = act(x @ w + b)
        return x @ p[-1][0] + p[-1][1]

    name = f"mnist_mlp{depth}x{width}" + ("" if activation == "relu" else f"_{activation}")
    return _classifier(name, steps, batch, init, logits, xtr, ytr, xte, yte)


def conv3x3(x, w):
    """A "SAME" 3x3 convolution (NHWC input, HWIO kernel) as one matrix product over the nine shifted copies of ``x``
    (im2col): XLA's CPU backend ran this, with its gradient, 19x faster than ``lax.conv_general_dilated`` on one
    thread."""
    n, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + h, j:j + wd] for i in range(3) for j in range(3)], -1)
    return cols @ w.reshape(9 * c, -1)


def cifar_cnn(n_train: int, n_test: int, steps: int, batch: int, channels=(16, 32, 64)) -> Task:
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

    def init(key):
        k = jax.random.split(key, len(channels) + 1)
        convs, c_in = [], 3
        for ki, c in zip(k, channels):
            convs.append((jax.random.normal(ki, (3, 3, c_in, c)) / float(np.sqrt(9 * c_in)), jnp.zeros(c)))
            c_in = c
        side = 32 // 2 ** len(channels)
        return convs + [_dense(k[-1], side * side * c_in, 10)]

    def logits(p, x):
        for w, b in p[:-1]:
            x = jax.nn.relu(conv3x3(x, w) + b)
            n, h, wd, c = x.shape  # 2x2 max pooling
            x = x.reshape(n, h // 2, 2, wd // 2, 2, c).max((2, 4))
        return x.reshape(x.shape[0], -1) @ p[-1][0] + p[-1][1]

    return replace(_classifier("cifar10_cnn", steps, batch, init, logits, xtr, ytr, xte, yte),
                   vmapped=False)


def char_transformer(steps: int, batch: int, ctx: int = 64, d: int = 64, layers: int = 2, heads: int = 4) -> Task:
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
        w = data[start[:, None] + jnp.arange(ctx + 1)]
        return w[:, :-1], w[:, 1:]

    def heldout(p):
        x, y = windows(val, jax.random.PRNGKey(123), 512)
        return {"val_loss": _xent(logits(p, x), y)}

    return Task("shakespeare_transformer", steps, init, lambda p, x, y: _xent(logits(p, x), y),
                lambda key: windows(train, key, batch), heldout, float(np.log(vocab)))


def run_group(task: Task, make_tx: Callable[[Any], optax.GradientTransformation], hparams: Any, seeds: Any):
    """Train one run per (hparams[i], seeds[i]) in a single jitted scan, the runs vmapped (or, for a task that says
    so, mapped one after another); returns losses and held-out metrics."""

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

    if task.vmapped:
        losses, held = jax.jit(jax.vmap(train))(hparams, seeds)
    else:  # (XLA's CPU backend ran the CNN's vmapped convolutions 1.2x slower than one at a time)
        losses, held = jax.jit(lambda h, s: jax.lax.map(lambda hs: train(*hs), (h, s)))(hparams, seeds)
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


def zero_output(meta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The MLP with its output layer at zero: STAR is then exactly AdamAggMo."""
    return {**meta, "w3": np.zeros_like(meta["w3"]), "b3": np.zeros_like(meta["b3"])}


def nonom_params(meta_name: str) -> dict[str, np.ndarray] | None:
    """The no-nominal baseline meta-trained beside ``meta_name``, or None where none was."""
    try:
        return load_star_params(meta_name.replace("star_", "star_nonom_", 1))
    except FileNotFoundError:
        return None


def evaluate(task: Task, seeds: list[int], meta_name: str, done: dict[str, Any] | None = None,
             partial: Callable[[dict[str, Any]], None] = lambda result: None,
             only: Sequence[str] = RUNNABLE) -> dict[str, Any]:
    """The task's runs of the optimizers in ``only`` (of :data:`RUNNABLE`; ``adam`` is the learning-rate grid),
    except those already in ``done`` (a previous, perhaps partial, result of the same task, which the result then
    extends). One optimizer (one learning rate of Adam's) at a time, its seeds in one :func:`run_group`, each handed
    to ``partial`` as it finishes, so that an interrupted task keeps what it had done."""
    n = len(seeds)
    results: dict[str, Any] = copy.deepcopy(done or {})
    results["chance"] = task.chance
    results["steps"] = task.steps
    star_meta = load_star_params(meta_name)
    sets = {  # name: (meta-parameters, step_mult, nominal_stepsize)
        "star": (star_meta, 1e-3, load_star_config(meta_name)["rule"]["nominal_stepsize"]),
        "star_nonom": (nonom_params(meta_name), 1e-3, 0.0),
        "adam_aggmo": (zero_output(star_meta), 1e-3, 1e-3),
    }
    runs: list[tuple[str, Callable[[], Any]]] = [
        (name, lambda spec=spec: _run_star(task, seeds, spec)) for name, spec in sets.items()
        if spec[0] is not None and name not in results and name in only]
    if "adam_1e-3" not in results and "adam" in only:
        grid = results.setdefault("adam_runs", {})
        runs += [(str(lr), lambda lr=lr: run_group(task, lambda lr: optax.adam(lr),
                                                   jnp.full((n,), lr, jnp.float32), jnp.asarray(seeds)))
                 for lr in ADAM_LRS if str(lr) not in grid]
    for name, run in runs:
        t0 = time.time()
        summary = summarise(*run())
        if name in sets:
            results[name] = summary
        else:
            results["adam_runs"][name] = summary
        results["wall_seconds"] = round(results.get("wall_seconds", 0.0) + time.time() - t0, 1)
        partial(results)
    if "adam_runs" in results and len(results["adam_runs"]) == len(ADAM_LRS):
        adam = {lr: results["adam_runs"][str(lr)] for lr in ADAM_LRS}
        finite = {lr: np.mean(r["final_train_loss"]) for lr, r in adam.items() if not any(r["diverged"])}
        best = min(finite or {lr: 0.0 for lr in ADAM_LRS}, key=lambda lr: finite.get(lr, np.inf))
        results["adam_1e-3"] = adam[1e-3]
        results["adam_best"] = dict(adam[best], lr=best)
        results["adam_grid"] = {str(lr): float(np.mean(r["final_train_loss"])) for lr, r in adam.items()}
        del results["adam_runs"]
    return results


def complete(result: dict[str, Any] | None, nonom: bool, only: Sequence[str] = RUNNABLE) -> bool:
    """Whether a task's result has every optimizer of ``only`` (the no-nominal baseline where its set exists)."""
    needed = [{"adam": "adam_1e-3"}.get(k, k) for k in only if k != "star_nonom" or nonom]
    return result is not None and all(k in result for k in needed)


def _run_star(task: Task, seeds: list[int], spec: tuple[Any, float, float]) -> tuple[np.ndarray, dict]:
    meta_params, step_mult, nominal = spec
    n = len(seeds)
    meta = {k: jnp.asarray(np.repeat(v[None], n, 0), jnp.float32) for k, v in meta_params.items()}
    return run_group(task, lambda hp: star(hp[0], step_mult=hp[1], nominal_stepsize=hp[2]),
                     (meta, jnp.full((n,), step_mult, jnp.float32), jnp.full((n,), nominal, jnp.float32)),
                     jnp.asarray(seeds))


def _metric(res: dict[str, Any]) -> str:
    return "test_acc" if "test_acc" in res["adam_1e-3"] else "val_loss"


def verdict(tasks: dict[str, Any]) -> dict[str, Any]:
    """The shipping criteria, per task and overall: no STAR run diverges (on any task, whether or not its Adam runs
    are done); STAR is not at chance (accuracy within
    5 points of 10%, or loss within 5% of chance) on a task where Adam at 1e-3 is not; STAR is within 2 points of
    accuracy (5% of the loss) of Adam at 1e-3 on the majority of tasks."""
    per_task = {}
    for name, res in tasks.items():
        if "star" not in res or "adam_1e-3" not in res:  # (a task under way)
            continue
        star_r, adam = res["star"], res["adam_1e-3"]
        metric = _metric(res)
        s, a = float(np.mean(star_r[metric])), float(np.mean(adam[metric]))
        if metric == "test_acc":
            at_chance = lambda acc: acc < 0.15  # noqa: E731
            close = s >= a - ACCURACY_MARGIN
        else:
            at_chance = lambda loss: loss > (1 - LOSS_MARGIN) * res["chance"]  # noqa: E731
            close = s <= a * (1 + LOSS_MARGIN)
        per_task[name] = {"diverged": int(sum(star_r["diverged"])), "at_chance": at_chance(s) and not at_chance(a),
                          "within_margin": bool(close), "star": s, "adam_1e-3": a, "metric": metric}
    never_diverges = not any(any(res["star"]["diverged"]) for res in tasks.values() if "star" in res)
    never_at_chance = not any(v["at_chance"] for v in per_task.values())
    majority = sum(v["within_margin"] for v in per_task.values()) > len(per_task) / 2
    return {"tasks": per_task, "never_diverges": never_diverges, "never_at_chance": never_at_chance,
            "within_margin_on_majority": majority, "ships": never_diverges and never_at_chance and majority}


def table(tasks: dict[str, Any]) -> str:
    rows = ["| task | optimizer | final train loss | held-out loss | held-out accuracy | diverged runs |",
            "|---|---|---|---|---|---|"]
    for task, res in tasks.items():
        for opt in OPTIMIZERS:
            if opt not in res:
                rows.append(f"| {task} | {opt} | not run | not run | not run | – |")
                continue
            r = res[opt]
            label = f"adam_best (lr {r['lr']:g})" if opt == "adam_best" else opt
            loss_key = "test_loss" if "test_loss" in r else "val_loss"
            acc = f"{np.mean(r['test_acc']):.3f} ± {np.std(r['test_acc']):.3f}" if "test_acc" in r else "–"
            rows.append(f"| {task} | {label} | {np.mean(r['final_train_loss']):.3f} ± "
                        f"{np.std(r['final_train_loss']):.3f} | {np.mean(r[loss_key]):.3f} ± "
                        f"{np.std(r[loss_key]):.3f} | {acc} | {sum(r['diverged'])}/{len(r['diverged'])} |")
    return "\n".join(rows)


def suite(quick: bool, steps: int = 2000) -> dict[str, Callable[[], Task]]:
    """The tasks by name, as constructors (data load only when a task runs)."""
    if quick:
        return {"mnist_mlp3x16": lambda: mnist_mlp(10, 16, 3, 16, n_test=256),
                "cifar10_cnn": lambda: cifar_cnn(64, 64, 8, 16, channels=(4, 8)),
                "shakespeare_transformer": lambda: char_transformer(8, 4, ctx=16, d=16, layers=1)}
    return {"mnist_mlp3x192": lambda: mnist_mlp(steps, 128, 3, 192),
            "mnist_mlp6x192": lambda: mnist_mlp(steps, 128, 6, 192),
            "mnist_mlp12x128": lambda: mnist_mlp(steps, 128, 12, 128),
            "mnist_mlp2x1024": lambda: mnist_mlp(steps, 128, 2, 1024),
            "mnist_mlp4x256_silu": lambda: mnist_mlp(steps, 128, 4, 256, "silu"),
            "cifar10_cnn": lambda: cifar_cnn(10000, 2000, steps, 64),
            "shakespeare_transformer": lambda: char_transformer(steps, 16)}


def _same_run(done: dict[str, Any], results: dict[str, Any]) -> bool:
    return all(done.get(k) == results[k] for k in ("meta_params", "seeds", "steps"))


def save(out: Path, results: dict[str, Any], names: list[str], seconds: float) -> dict[str, Any]:
    """Writes ``results`` to ``out``, keeping the other tasks of the same configuration that ``out`` holds (another
    process's share of the suite, ``--tasks``), with the table and verdict over them all and ``seconds`` added to
    the wall time; under a lock, and by a rename, so that neither a second process nor an interruption leaves a
    torn file. Returns what was written."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = dict(results, tasks={}, wall_seconds=0.0)
        if out.exists():
            done = json.loads(out.read_text())
            if _same_run(done, results):
                merged.update(tasks=done["tasks"], wall_seconds=done.get("wall_seconds", 0.0))
        merged["tasks"].update(results["tasks"])
        merged["tasks"] = {n: merged["tasks"][n] for n in names if n in merged["tasks"]}
        merged["wall_seconds"] = round(merged["wall_seconds"] + seconds, 1)
        merged["table"] = table(merged["tasks"])
        merged["verdict"] = verdict(merged["tasks"])
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(merged, indent=1) + "\n")
        tmp.replace(out)
        out.with_suffix(".md").write_text(merged["table"] + "\n")
    return merged


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and one seed: a CI smoke run")
    ap.add_argument("--seeds", type=int, default=SEEDS)
    ap.add_argument("--meta", default=DEFAULT_PARAMS, help="the STAR parameter set (star_<tag>; its baseline is "
                                                           "star_nonom_<tag>)")
    ap.add_argument("--steps", type=int, default=2000, help="steps per run (10x the meta-training horizon)")
    ap.add_argument("--tasks", default="", help="a comma-separated share of the suite's tasks (default: all), "
                                                "for processes that share one --out")
    ap.add_argument("--optimizers", default=",".join(RUNNABLE),
                    help=f"a comma-separated share of the optimizers (of {', '.join(RUNNABLE)}; adam is its grid)")
    ap.add_argument("--out", type=Path, default=ROOT / "examples" / "results" / "star" / "eval.json")
    args = ap.parse_args(argv)
    seeds = [0] if args.quick else list(range(args.seeds))
    tasks = suite(args.quick, args.steps)
    chosen = [t for t in args.tasks.split(",") if t] or list(tasks)
    unknown = [t for t in chosen if t not in tasks]
    if unknown:
        ap.error(f"--tasks: no task {', '.join(unknown)} in the suite (it has {', '.join(tasks)})")
    only = [o for o in args.optimizers.split(",") if o]
    if not only or any(o not in RUNNABLE for o in only):
        ap.error(f"--optimizers: {args.optimizers!r} is not a comma-separated list of {', '.join(RUNNABLE)}")
    argv = list(argv if argv is not None else sys.argv[1:])
    if "--tasks" in argv:  # the suite's command, whichever share of it this process runs
        del argv[argv.index("--tasks"):argv.index("--tasks") + 2]
    argv = [a for a in argv if not a.startswith("--tasks=")]
    results = {"quick": args.quick, "seeds": seeds, "meta_params": args.meta, "steps": args.steps,
               "meta_training_horizon": load_star_config(args.meta)["config"]["horizon"],
               "command": "python examples/star_eval.py " + " ".join(argv), "tasks": {}}
    merged = dict(results)
    if not args.quick and args.out.exists():  # resume: keep the finished tasks of the same configuration
        previous = json.loads(args.out.read_text())
        if _same_run(previous, results):
            merged = previous
    nonom = nonom_params(args.meta) is not None
    for name in chosen:
        if not args.quick and args.out.exists():  # (another process's share may have moved on)
            previous = json.loads(args.out.read_text())
            if _same_run(previous, results):
                merged = previous
        have = merged["tasks"].get(name)
        if complete(have, nonom, only):
            continue  # (a task run before the no-nominal set existed gets that column added)
        clock = [time.time()]

        def partial(result: dict[str, Any], name: str = name, clock: list[float] = clock) -> None:
            """Written after every optimizer, so an interrupted run keeps (and resumes from) what it did."""
            if not args.quick:
                save(args.out, dict(results, tasks={name: result}), list(tasks), time.time() - clock[0])
                clock[0] = time.time()

        result = evaluate(tasks[name](), seeds, args.meta, have, partial, only)
        print(f"{name}: {result['wall_seconds']} s", flush=True)
        merged = save(args.out, dict(results, tasks={name: result}), list(tasks), 0.0) if not args.quick else \
            dict(merged, tasks={**merged["tasks"], name: result})
    print(table(merged["tasks"]))
    print(json.dumps({k: v for k, v in verdict(merged["tasks"]).items() if k != "tasks"}))


if __name__ == "__main__":
    main()
