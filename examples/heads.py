"""Output heads under Nero: constrained or not, zero-initialised or not, tied to the embedding or not.

Two small measurements behind the quickstart's advice on output heads:

* **MLP on MNIST** (784-256-256-10, 10k training images, batch 128): the head zero-initialised (a common pattern)
  or torch's default init, constrained (unit-norm, zero-mean rows) or unconstrained; Adam (lr 1e-3) for scale.
  ``--head-sigma`` sets the scale an unconstrained zero-initialised neuron tensor starts with, to compare a
  candidate rule with the core's (0.01 where a tensor starts at zero) without changing the core.
* **Tied-embedding character LM on Tiny Shakespeare** (a 2-layer transformer, d=64, context 64, batch 32): the
  output head is the embedding table, constrained (Nero's default for an ``Embedding``) or unconstrained; an
  untied head, unconstrained, for comparison; Adam (lr 3e-3) for scale.

Every run is one thread, a fixed number of steps, seeds 0..n-1; the record holds each run's final losses.

    python examples/heads.py --out examples/results/heads          # about 10 minutes on one core
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import nero_core._nero as core_nero
import nero_torch
from harness import data


def with_head_sigma(sigma: float | None):
    """Make the core's first update give an unconstrained zero-initialised neuron tensor ``sigma`` (None: the
    core's own rule), by wrapping its neuron update: a measurement aid, not a change of the rule."""
    if sigma is None:
        return lambda: None
    if not hasattr(core_nero, "_with_floor"):
        raise RuntimeError("--head-sigma wraps the core rule as it was at 037d666; this core has no _with_floor")
    update, floor = core_nero._update_neurons, core_nero._with_floor
    inside = {"neuron": False}

    def neuron_update(*args, **kwargs):
        inside["neuron"] = True
        try:
            return update(*args, **kwargs)
        finally:
            inside["neuron"] = False

    def neuron_floor(scale, xp):
        if inside["neuron"]:
            return xp.where(scale > 0, scale, xp.full_like(scale, sigma))
        return floor(scale, xp)

    def restore() -> None:
        core_nero._update_neurons, core_nero._with_floor = update, floor

    core_nero._update_neurons, core_nero._with_floor = neuron_update, neuron_floor
    return restore


# ---- MLP on MNIST ------------------------------------------------------------------------------------------------


def mlp_run(config: dict, seed: int, steps: int, mnist) -> dict:
    x_train, y_train, x_test, y_test = mnist
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    if config["zero_head"]:
        nn.init.zeros_(model[4].weight)
        nn.init.zeros_(model[4].bias)
    if config["optimizer"] == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        free = [] if config["constrained"] else ["4"]
        opt = nero_torch.Nero(nero_torch.param_groups(model, unconstrained=free), lr=0.01)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        batch = torch.randint(0, len(x_train), (128,), generator=generator)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        head_norm = model[4].weight.norm(dim=1).mean().item()
    return {"train_loss": statistics.fmean(losses[-50:]), "test_accuracy": accuracy, "head_row_norm": head_norm}


MLP_CONFIGS = {
    "constrained head, zero init": dict(optimizer="nero", constrained=True, zero_head=True),
    "unconstrained head, zero init": dict(optimizer="nero", constrained=False, zero_head=True),
    "constrained head, default init": dict(optimizer="nero", constrained=True, zero_head=False),
    "unconstrained head, default init": dict(optimizer="nero", constrained=False, zero_head=False),
    "Adam, zero init": dict(optimizer="adam", constrained=None, zero_head=True),
}


# ---- tied-embedding character LM ---------------------------------------------------------------------------------


class CharLM(nn.Module):
    def __init__(self, vocabulary: int, tied: bool, d: int = 64, context: int = 64, layers: int = 2):
        super().__init__()
        self.tokens = nn.Embedding(vocabulary, d)
        self.positions = nn.Embedding(context, d)
        block = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocabulary, bias=False)
        if tied:
            self.head.weight = self.tokens.weight
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))
        return self.head(self.norm(self.blocks(h, mask=self.mask, is_causal=True)))


def lm_run(config: dict, seed: int, steps: int, text) -> dict:
    train, val, vocabulary = text
    torch.manual_seed(seed)
    model = CharLM(len(vocabulary), tied=config["tied"])
    if config["optimizer"] == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    else:
        free = [] if config["constrained"] else ["head"]
        opt = nero_torch.Nero(nero_torch.param_groups(model, unconstrained=free), lr=0.01)
    generator = torch.Generator().manual_seed(seed)

    def batch(ids: torch.Tensor, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(0, len(ids) - 65, (size,), generator=generator)
        chunk = torch.stack([ids[s:s + 65] for s in start.tolist()])
        return chunk[:, :-1], chunk[:, 1:]

    def loss_on(x, y):
        return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())

    losses = []
    for _ in range(steps):
        x, y = batch(train)
        opt.zero_grad()
        loss = loss_on(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        val_loss = statistics.fmean(loss_on(*batch(val, 64)).item() for _ in range(8))
    return {"train_loss": statistics.fmean(losses[-50:]), "val_loss": val_loss}


LM_CONFIGS = {
    "tied head, constrained": dict(optimizer="nero", tied=True, constrained=True),
    "tied head, unconstrained": dict(optimizer="nero", tied=True, constrained=False),
    "untied head, constrained": dict(optimizer="nero", tied=False, constrained=True),
    "untied head, unconstrained": dict(optimizer="nero", tied=False, constrained=False),
    "Adam, tied head": dict(optimizer="adam", tied=True, constrained=None),
}


# ---- the study ---------------------------------------------------------------------------------------------------


def summary(runs: list[dict]) -> dict:
    return {
        key: {"mean": statistics.fmean(r[key] for r in runs), "min": min(r[key] for r in runs),
              "max": max(r[key] for r in runs)}
        for key in runs[0]
    }


def table(title: str, results: dict, columns: list[str]) -> str:
    lines = [f"**{title}**", "", "| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, record in results.items():
        cells = [f"{record['summary'][c]['mean']:.3f} ({record['summary'][c]['min']:.3f} to "
                 f"{record['summary'][c]['max']:.3f})" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/results/heads"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--mlp-steps", type=int, default=600)
    parser.add_argument("--lm-steps", type=int, default=600)
    parser.add_argument("--head-sigma", type=float, nargs="*", default=[1.0],
                        help="candidate starting scales of an unconstrained zero-initialised head (besides the core's)")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    mnist = data.mnist(args.data_dir, train_size=10_000, test_size=2_000)
    mlp_configs = dict(MLP_CONFIGS)
    for sigma in args.head_sigma:
        mlp_configs[f"unconstrained head, zero init, sigma {sigma:g}"] = dict(
            optimizer="nero", constrained=False, zero_head=True, head_sigma=sigma)
    mlp = {}
    for name, config in mlp_configs.items():
        restore = with_head_sigma(config.get("head_sigma"))
        runs = [mlp_run(config, seed, args.mlp_steps, mnist) for seed in range(args.seeds)]
        restore()
        mlp[name] = {"config": config, "runs": runs, "summary": summary(runs)}
        print(name, mlp[name]["summary"], flush=True)
    text = data.shakespeare(args.data_dir)
    lm = {}
    for name, config in LM_CONFIGS.items():
        runs = [lm_run(config, seed, args.lm_steps, text) for seed in range(args.seeds)]
        lm[name] = {"config": config, "runs": runs, "summary": summary(runs)}
        print(name, lm[name]["summary"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"command": "python examples/heads.py " + " ".join(argv or []), "seeds": args.seeds,
              "mlp_steps": args.mlp_steps, "lm_steps": args.lm_steps, "seconds": round(time.time() - started),
              "torch": torch.__version__, "mlp": mlp, "lm": lm}
    (args.out / "heads.json").write_text(json.dumps(record, indent=1))
    (args.out / "heads.md").write_text(
        table(f"MLP on MNIST, {args.mlp_steps} steps, {args.seeds} seeds: mean (min to max)", mlp,
              ["train_loss", "test_accuracy", "head_row_norm"])
        + "\n\n"
        + table(f"Character LM on Tiny Shakespeare, {args.lm_steps} steps, {args.seeds} seeds", lm,
                ["train_loss", "val_loss"]) + "\n"
    )
    print(f"done in {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
