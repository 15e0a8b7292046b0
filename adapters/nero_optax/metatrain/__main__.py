"""Meta-train STAR (and the baseline without the nominal term) and write the shipped meta-parameters.

    python -m nero_optax.metatrain                 # the shipped parameters: both variants, ~16 min on one core
    python -m nero_optax.metatrain --outer-steps 4000 --pairs 16 --truncation 50 --horizon 1000 --tag long
                                                   # a longer run (about 4 CPU hours, estimated from the step rate)

The defaults are the run that made the parameters shipped in ``nero_core/data``: a fixed number of outer steps,
not a time budget, so a rerun takes the same steps (``--minutes`` stops a run early by the clock instead).

Writes ``<out-dir>/<name>.npz`` (the MLP weights) and ``<name>.json`` (command, configuration, wall time, stability
check), and appends one JSON line per outer step to ``--log``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .nqm import nqm_check
from .pes import Hyper, init_particles, init_theta, pes_step
from .tasks import FAMILIES, load_dataset

VARIANTS = {"star": ("star", 1e-3), "nonom": ("star_nonom", 0.0)}  # name prefix, nominal step size


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nero_optax.metatrain", description=__doc__.split("\n")[1])
    p.add_argument("--variant", choices=["star", "nonom", "both"], default="both")
    p.add_argument("--outer-steps", type=int, default=1500, help="outer (meta) steps per variant")
    p.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget per variant; 0: none")
    p.add_argument("--estimator", choices=["pes", "es"], default="pes", help="es: truncation = horizon")
    p.add_argument("--pairs", type=int, default=8, help="antithetic pairs per outer step")
    p.add_argument("--truncation", type=int, default=20, help="inner steps per truncated unroll")
    p.add_argument("--horizon", type=int, default=200, help="inner steps per episode (task)")
    p.add_argument("--sigma", type=float, default=0.01, help="ES perturbation scale")
    p.add_argument("--lr", type=float, default=3e-3, help="outer AdamW learning rate")
    p.add_argument("--meta-weight-decay", type=float, default=0.1, help="outer AdamW weight decay on theta")
    p.add_argument("--step-mult", type=float, default=1e-3)
    p.add_argument("--nqm-every", type=int, default=250)
    p.add_argument("--nqm-steps", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="v1", help="files are <variant>_<tag>.npz/.json")
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


def metatrain(variant: str, args: argparse.Namespace, data: dict, log) -> dict:
    prefix, nominal = VARIANTS[variant]
    name = f"{prefix}_{args.tag}"
    hyper = Hyper(step_mult=args.step_mult, nominal_stepsize=nominal, weight_decay=0.0)
    key = jax.random.PRNGKey(args.seed)
    key, sub = jax.random.split(key)
    theta = _commit(init_theta(sub))
    outer = optax.adamw(args.lr, weight_decay=args.meta_weight_decay)
    outer_state = _commit(outer.init(theta))

    @jax.jit
    def outer_step(grad, outer_state, theta):
        updates, outer_state = outer.update(grad, outer_state, theta)
        return optax.apply_updates(theta, updates), outer_state, optax.global_norm(grad)

    rng = np.random.default_rng(args.seed)
    per_episode = args.horizon // args.truncation
    start, step, nqm = time.time(), 0, None
    args.out_dir.mkdir(parents=True, exist_ok=True)
    while step < args.outer_steps and not (args.minutes and time.time() - start > 60 * args.minutes):
        if step % per_episode == 0:
            family = FAMILIES[rng.integers(len(FAMILIES))]
            x, y = data[family.dataset]
            key, sub = jax.random.split(key)
            particles = _commit(init_particles(family, theta, hyper, sub, args.pairs, x.shape[1]))
        key, sub = jax.random.split(key)
        grad, particles, loss = pes_step(family, theta, particles, sub, x, y, hyper=hyper,
                                         steps=args.truncation, sigma=args.sigma)
        theta, outer_state, grad_norm = outer_step(grad, outer_state, theta)
        step += 1
        record = {"variant": variant, "step": step, "family": family.name, "truncation": (step - 1) % per_episode,
                  "meta_loss": float(loss), "grad_norm": float(grad_norm),
                  "wall_s": round(time.time() - start, 2)}
        if step % args.nqm_every == 0:
            nqm = nqm_check(theta, hyper, steps=args.nqm_steps)
            record["nqm"] = nqm
            _save(theta, args.out_dir / f"{name}.npz")
        log.write(json.dumps(record) + "\n")
        log.flush()
    nqm = nqm_check(theta, hyper, steps=args.nqm_steps)
    wall = time.time() - start
    _save(theta, args.out_dir / f"{name}.npz")
    record = {
        "name": name,
        "label": args.label,
        "command": "python -m nero_optax.metatrain " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "rule": {"step_mult": hyper.step_mult, "nominal_stepsize": hyper.nominal_stepsize,
                 "weight_decay": hyper.weight_decay},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "families": [f.name for f in FAMILIES],
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
    for name in sorted({f.dataset for f in FAMILIES}):
        d = load_dataset(name)
        data[name] = _commit((jnp.asarray(d.x), jnp.asarray(d.y)))
    args.log.parent.mkdir(parents=True, exist_ok=True)
    variants = ["star", "nonom"] if args.variant == "both" else [args.variant]
    with args.log.open("a") as log:
        for variant in variants:
            record = metatrain(variant, args, data, log)
            print(json.dumps({k: record[k] for k in ("name", "outer_steps_done", "wall_seconds", "nqm_check")}))


if __name__ == "__main__":
    main()
