"""Meta-train STAR (and the baseline without the nominal term) and write the shipped meta-parameters.

    python -m nero_optax.metatrain              # the shipped parameters: both variants, one after the other
    python -m nero_optax.metatrain --families smoke --outer-steps 4 --pairs 2 --truncation 2 --horizon 4 \\
        --nqm-steps 10 --out-dir /tmp/mt        # a smoke run of the whole loop, seconds

The defaults are the run that made the parameters shipped in ``nero_core/data``: a fixed number of outer steps,
not a time budget, so a rerun takes the same steps (``--minutes`` stops a run early by the clock instead).

A run is resumable: at the end of every episode (``horizon / truncation`` outer steps, after which the inner
trainings start afresh) it writes a checkpoint, ``<out-dir>/<name>.ckpt.npz`` (meta-parameters, outer optimizer
state, random keys, step, wall time so far). Started again with the same arguments it continues from there,
dropping the log lines of the steps after it, and takes exactly the steps an uninterrupted run would have taken.

Writes ``<out-dir>/<name>.npz`` (the MLP weights) and ``<name>.json`` (command, configuration, wall time, stability
check), and appends one JSON line per outer step to ``--log``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .nqm import nqm_check
from .pes import Hyper, init_particles, init_theta, pes_step
from .tasks import families, load_dataset

VARIANTS = {"star": ("star", 1e-3), "nonom": ("star_nonom", 0.0)}  # name prefix, nominal step size


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nero_optax.metatrain", description=__doc__.split("\n")[1])
    p.add_argument("--variant", choices=["star", "nonom", "both"], default="both")
    p.add_argument("--families", default="default", help="the task families: 'default' or 'smoke'")
    p.add_argument("--outer-steps", type=int, default=3000, help="outer (meta) steps per variant")
    p.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget per variant; 0: none")
    p.add_argument("--estimator", choices=["pes", "es"], default="pes", help="es: truncation = horizon")
    p.add_argument("--pairs", type=int, default=8, help="antithetic pairs per outer step")
    p.add_argument("--truncation", type=int, default=20, help="inner steps per truncated unroll")
    p.add_argument("--horizon", type=int, default=200, help="inner steps per episode (task)")
    p.add_argument("--sigma", type=float, default=0.01, help="ES perturbation scale")
    p.add_argument("--lr", type=float, default=3e-3, help="outer AdamW learning rate")
    p.add_argument("--meta-weight-decay", type=float, default=0.1, help="outer AdamW weight decay on theta")
    p.add_argument("--step-mult", type=float, default=1e-3)
    p.add_argument("--nqm-every", type=int, default=500)
    p.add_argument("--nqm-steps", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="v2", help="files are <variant>_<tag>.npz/.json")
    p.add_argument("--label", default="shipped", help="recorded in the JSON, e.g. 'reduced'")
    p.add_argument("--out-dir", type=Path, default=Path("nero_core/data"))
    p.add_argument("--log", type=Path, default=Path("examples/results/star/metatrain_log.jsonl"))
    args = p.parse_args(argv)
    if args.estimator == "es":
        args.truncation = args.horizon
    if args.horizon % args.truncation:
        p.error("--horizon must be a multiple of --truncation")
    return args


def _save(theta, path: Path) -> None:
    np.savez(path, **{k: np.asarray(v, np.float32) for k, v in theta.items()})


def _commit(tree):
    """Place on the default device explicitly: a jitted call whose inputs flip from uncommitted to committed
    arrays compiles again."""
    return jax.device_put(tree, jax.devices()[0])


def _write_checkpoint(path: Path, theta, outer_state, key, rng: np.random.Generator, step: int, wall: float) -> None:
    """Everything the next episode needs, written to a temporary file and renamed (an interruption mid-write leaves
    the previous checkpoint whole)."""
    leaves = jax.tree_util.tree_leaves((theta, outer_state))
    meta = {"step": step, "wall_seconds": wall, "rng": rng.bit_generator.state}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, key=np.asarray(jax.random.key_data(key)), meta=np.asarray(json.dumps(meta)),
             **{f"leaf{i}": np.asarray(a) for i, a in enumerate(leaves)})
    os.replace(tmp, path)


def _read_checkpoint(path: Path, theta, outer_state) -> tuple[Any, Any, Any, np.random.Generator, int, float]:
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        tree = jax.tree_util.tree_structure((theta, outer_state))
        leaves = [jnp.asarray(f[f"leaf{i}"]) for i in range(tree.num_leaves)]
        key = jax.random.wrap_key_data(jnp.asarray(f["key"]))
    theta, outer_state = jax.tree_util.tree_unflatten(tree, leaves)
    rng = np.random.default_rng()
    rng.bit_generator.state = meta["rng"]
    return _commit(theta), _commit(outer_state), key, rng, int(meta["step"]), float(meta["wall_seconds"])


def _drop_log_after(log: Path, variant: str, step: int) -> None:
    """Remove this variant's log lines past ``step`` (written after the checkpoint a resumed run starts from)."""
    if not log.exists():
        return
    keep = [line for line in log.read_text().splitlines()
            if not (json.loads(line).get("variant") == variant and json.loads(line).get("step", 0) > step)]
    log.write_text("".join(line + "\n" for line in keep))


def metatrain(variant: str, args: argparse.Namespace, data: dict, log_path: Path) -> dict:
    prefix, nominal = VARIANTS[variant]
    name = f"{prefix}_{args.tag}"
    family_set = families(args.families)
    hyper = Hyper(step_mult=args.step_mult, nominal_stepsize=nominal, weight_decay=0.0)
    key = jax.random.key(args.seed)
    key, sub = jax.random.split(key)
    theta = _commit(init_theta(sub))
    outer = optax.adamw(args.lr, weight_decay=args.meta_weight_decay)
    outer_state = _commit(outer.init(theta))
    rng = np.random.default_rng(args.seed)
    step, wall_before = 0, 0.0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out_dir / f"{name}.ckpt.npz"
    if checkpoint.exists():
        theta, outer_state, key, rng, step, wall_before = _read_checkpoint(checkpoint, theta, outer_state)
        print(f"{name}: resuming from outer step {step} ({wall_before:.0f} s so far)", flush=True)
    _drop_log_after(log_path, variant, step)

    @jax.jit
    def outer_step(grad, outer_state, theta):
        updates, outer_state = outer.update(grad, outer_state, theta)
        return optax.apply_updates(theta, updates), outer_state, optax.global_norm(grad)

    per_episode = args.horizon // args.truncation
    start = time.time()
    with log_path.open("a") as log:
        while step < args.outer_steps and not (args.minutes and time.time() - start > 60 * args.minutes):
            if step % per_episode == 0:
                _write_checkpoint(checkpoint, theta, outer_state, key, rng, step, wall_before + time.time() - start)
                family = family_set[rng.integers(len(family_set))]
                d = data[family.dataset]
                key, sub = jax.random.split(key)
                particles = _commit(init_particles(family, theta, hyper, sub, args.pairs, d.x.shape[-1], d.classes))
            key, sub = jax.random.split(key)
            grad, particles, loss = pes_step(family, theta, particles, sub, d.x, d.y, hyper=hyper,
                                             steps=args.truncation, sigma=args.sigma, chance=float(np.log(d.classes)))
            theta, outer_state, grad_norm = outer_step(grad, outer_state, theta)
            step += 1
            record = {"variant": variant, "step": step, "family": family.name,
                      "truncation": (step - 1) % per_episode, "meta_loss": float(loss),
                      "grad_norm": float(grad_norm), "wall_s": round(wall_before + time.time() - start, 2)}
            if step % args.nqm_every == 0:
                record["nqm"] = nqm_check(theta, hyper, steps=args.nqm_steps)
                _save(theta, args.out_dir / f"{name}.npz")
            log.write(json.dumps(record) + "\n")
            log.flush()
    nqm = nqm_check(theta, hyper, steps=args.nqm_steps)
    wall = wall_before + time.time() - start
    if step % per_episode == 0:
        _write_checkpoint(checkpoint, theta, outer_state, key, rng, step, wall)
    _save(theta, args.out_dir / f"{name}.npz")
    record = {
        "name": name,
        "label": args.label,
        "command": "python -m nero_optax.metatrain " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "rule": {"step_mult": hyper.step_mult, "nominal_stepsize": hyper.nominal_stepsize,
                 "weight_decay": hyper.weight_decay},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "families": [f.name for f in family_set],
        "outer_steps_done": step,
        "wall_seconds": round(wall, 1),
        "nqm_check": nqm,
        "jax": jax.__version__,
    }
    (args.out_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    data = {}
    for name in sorted({f.dataset for f in families(args.families)}):
        d = load_dataset(name)
        data[name] = type(d)(*_commit((jnp.asarray(d.x), jnp.asarray(d.y))), d.classes)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    variants = ["star", "nonom"] if args.variant == "both" else [args.variant]
    for variant in variants:
        record = metatrain(variant, args, data, args.log)
        print(json.dumps({k: record[k] for k in ("name", "outer_steps_done", "wall_seconds", "nqm_check")}),
              flush=True)


if __name__ == "__main__":
    main()
