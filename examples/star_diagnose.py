"""Why STAR fails where it does: the learned step against the nominal step, tensor by tensor, on plain MNIST MLPs.

The setting of issue 23: ReLU MLPs of 3 and 6 linear layers, 192 wide (``harness.models.mlp``), on MNIST, batch
128, one epoch (468 steps), seed 0, in PyTorch, with the core rule ``nero_core.star`` called on the tensors. For
each net it trains Adam at 1e-3, AdamAggMo (STAR with ``step_mult=0``: the learned term switched off) and STAR,
and along STAR's own trajectory measures, over the first 100 steps, the ratio ``rms(learned step) / rms(nominal
step)`` of every tensor: the learned step is the difference between the update with ``step_mult=0`` and the full
update from the same state, the nominal step the difference between the parameters and the update with
``step_mult=0``. It also records each tensor's gradient root mean square at the first step, which sets the size
of ``rsqrt(v + 1e-6)``.

    python examples/star_diagnose.py                          # the shipped default parameters
    python examples/star_diagnose.py --meta star_v1 --out ... # another set
    python examples/star_diagnose.py --optimizers star --steps 100   # the ratios only (the first 100 steps)
    python examples/star_diagnose.py --optimizers adam,star_torch    # as a user runs it: nero_torch.Star's defaults

Apart from ``star_torch``, it uses only ``nero_core.star(meta, step_mult=...)``, so the same script measures an
older commit's rule.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from harness.data import mnist  # noqa: E402
from harness.models import mlp  # noqa: E402

import nero_torch  # noqa: E402
from nero_core._star import DEFAULT_PARAMS, load_star_params, star  # noqa: E402

MEASURED_STEPS = 100
BATCH = 128


def rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def train(depth: int, optimizer: str, meta_name: str, data, steps: int) -> dict:
    """``steps`` steps (at most one epoch) from seed 0; for ``optimizer == "star"`` also the per-tensor step ratios
    of the first steps."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(0)
    model = mlp(784, 192, 10, depth=depth)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))
    if optimizer == "adam":
        torch_opt = torch.optim.Adam(params, lr=1e-3)
    elif optimizer == "star_torch":  # what a user runs: the torch.optim adapter with its defaults
        torch_opt = nero_torch.Star(params, **({} if meta_name == DEFAULT_PARAMS else {"meta_params": meta_name}))
    else:
        meta = load_star_params(meta_name)
        rule = star(meta, step_mult=0.0 if optimizer == "adam_aggmo" else 1e-3)
        nominal_only = star(meta, step_mult=0.0)
        state = rule.init([p.detach() for p in params])
    losses, ratios, grad_rms = [], [], []
    for step in range(min(steps, len(x_train) // BATCH)):
        idx = order[step * BATCH:(step + 1) * BATCH]
        loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        model.zero_grad()
        loss.backward()
        losses.append(loss.item())
        if optimizer in ("adam", "star_torch"):
            torch_opt.step()
            continue
        with torch.no_grad():
            old, grads = [p.detach().clone() for p in params], [p.grad for p in params]
            new, state_after = rule.update(grads, state, old)
            if optimizer == "star" and step < MEASURED_STEPS:
                nominal, _ = nominal_only.update(grads, state, old)
                ratios.append([rms(b - a) / max(rms(o - b), 1e-30) for o, a, b in zip(old, new, nominal)])
                if step == 0:
                    grad_rms = [rms(g) for g in grads]
            state = state_after
            for p, q in zip(params, new):
                p.copy_(q)
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    out = {"test_acc": accuracy, "loss_step10": losses[9], "loss_step100": losses[99],
           "final_loss": float(np.mean(losses[-20:])), "steps": len(losses)}
    if ratios:
        r = np.asarray(ratios)
        out["ratio"] = {name: {"step1": r[0, j], "step10": r[9, j], "step100": r[-1, j],
                               "median_first100": float(np.median(r[:, j])), "max_first100": float(r[:, j].max()),
                               "grad_rms_step1": grad_rms[j]} for j, name in enumerate(names)}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--meta", default=DEFAULT_PARAMS)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--optimizers", default="adam,adam_aggmo,star", help="of adam, adam_aggmo, star, star_torch "
                                                                        "(nero_torch.Star with its defaults)")
    ap.add_argument("--steps", type=int, default=10**9, help="training steps (default: one epoch); at least 100")
    ap.add_argument("--out", type=Path, default=None, help="default: examples/results/star/diagnose_<meta>.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    load_star_params(args.meta)  # an unknown set fails here, before any training
    data = mnist(args.data_dir)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    record = {"command": "python examples/star_diagnose.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "commit": commit, "nero_core": str(Path(sys.modules["nero_core"].__file__).parent),
              "meta_params": args.meta, "nets": {}}
    for depth in (3, 6):
        net = record["nets"][f"mlp{depth}x192"] = {}
        for optimizer in args.optimizers.split(","):
            start = time.time()
            net[optimizer] = train(depth, optimizer, args.meta, data, args.steps)
            summary = {k: round(v, 3) for k, v in net[optimizer].items() if isinstance(v, float)}
            print(f"mlp{depth}x192 {optimizer}: {summary} ({time.time() - start:.0f} s)", flush=True)
    out = args.out or ROOT / "results" / "star" / f"diagnose_{args.meta}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
