"""Does automatic gradient descent train deep fully connected networks with no tuning?

Fully connected ReLU networks of depth 2 to 32 on CIFAR-10 and MNIST, trained by AGD (gain 1, nothing tuned), by
Adam at 1e-3 and SGD at 0.1 (their defaults) and by Adam and SGD at the best learning rate of a grid. Every
optimizer starts from the same weights, AGD's initialisation, so only the optimizer differs.

    python examples/agd_depth.py --quick        # ~2 minutes on 2 cores: subsets, depths 2 and 32, one seed
    python examples/agd_depth.py                # the full study: depths 2-32, 3 seeds, full data (hours on a CPU)
    nice python examples/agd_depth.py --depths 2 8 16 32 --epochs 1 --train-size 10000   # a moderate version

Writes ``records.jsonl`` (one line per run, appended as runs finish), ``summary.json`` and ``agd_depth.png`` to
``--out`` (default ``examples/results/agd_depth/``). Data comes from ``--data-dir`` or ``$NERO_DATA_DIR``
(``mnist.npz``, ``cifar10_jpeg.npz``; see ``shared/data/SOURCES.md``).

The network: ``depth`` bias-free linear layers, width ``--width``, with ``sqrt(2) * relu`` between them (the
factor keeps the signal's scale through depth under orthogonal weights), cross-entropy loss. The best learning
rate is picked per dataset and depth by mean test accuracy over seeds, which flatters the baselines.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nero_torch.agd import AGD

DEFAULT_LR = {"adam": 1e-3, "sgd": 0.1}
LR_GRID = {"adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), "sgd": (0.01, 0.03, 0.1, 0.3, 1.0)}
NAMES = {"agd": "AGD", "adam": "Adam", "sgd": "SGD"}
IMAGE_STATS = {"mnist": ((0.1307,), (0.3081,)), "cifar10": ((0.4913, 0.4821, 0.4465), (0.2452, 0.2428, 0.2606))}


# ---------------------------------------------------------------------------------------------------- data


def _decode(buffer: np.ndarray, offsets: np.ndarray, index: np.ndarray) -> np.ndarray:
    from PIL import Image

    images = [Image.open(io.BytesIO(buffer[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB") for i in index]
    return np.stack([np.asarray(im) for im in images]) if images else np.zeros((0, 32, 32, 3), np.uint8)


def load(name: str, data_dir: Path, train_size: int | None, test_size: int | None) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_test, y_test)``: flat float vectors standardised per channel. A subset is a random
    draw fixed by seed 0 (the files are sorted by class, so a prefix would not do)."""
    rng = np.random.default_rng(0)
    out = []
    with np.load(data_dir / ("mnist.npz" if name == "mnist" else "cifar10_jpeg.npz"), allow_pickle=False) as f:
        for split, size in (("train", train_size), ("test", test_size)):
            labels = f[f"y_{split}"] if name == "mnist" else f[f"{split}_labels"]
            index = np.sort(rng.permutation(len(labels))[:size]) if size else np.arange(len(labels))
            if name == "mnist":
                images = f[f"x_{split}"][index][..., None]
            else:
                images = _decode(f[f"{split}_jpeg"], f[f"{split}_offsets"], index)
            mean, std = (np.asarray(v, np.float32) for v in IMAGE_STATS[name])
            x = (images.astype(np.float32) / 255.0 - mean) / std
            out += [torch.from_numpy(x.reshape(len(x), -1)), torch.from_numpy(labels[index].astype(np.int64))]
    return tuple(out)


# ---------------------------------------------------------------------------------------------------- model


class ScaledReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * math.sqrt(2.0)


def network(inputs: int, width: int, depth: int, classes: int = 10) -> nn.Sequential:
    sizes = [inputs] + [width] * (depth - 1) + [classes]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b, bias=False)] + ([ScaledReLU()] if i < depth - 1 else [])
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------------- one run


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> tuple[float, float]:
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch):
        logits = model(x[i : i + batch])
        loss += float(nn.functional.cross_entropy(logits, y[i : i + batch], reduction="sum"))
        correct += int((logits.argmax(1) == y[i : i + batch]).sum())
    return loss / len(x), correct / len(x)


def train(data, *, depth: int, optimizer: str, lr: float | None, seed: int, args) -> dict:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = network(x_train.shape[1], args.width, depth)
    AGD(model.parameters()).init_weights(seed)  # the same start for every optimizer
    if optimizer == "agd":
        opt = AGD(model.parameters())
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses, etas, start = [], [], time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
            batch = order[i : i + args.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            eta = opt.step()
            losses.append(loss.item())
            if optimizer == "agd":
                etas.append(eta)
            if not math.isfinite(losses[-1]):
                break
    train_loss, train_acc = evaluate(model, x_train, y_train)
    test_loss, test_acc = evaluate(model, x_test, y_test)
    return dict(
        dataset=args.dataset, depth=depth, optimizer=optimizer, lr=lr, seed=seed,
        train_loss=train_loss if math.isfinite(train_loss) else None, train_acc=train_acc,
        test_loss=test_loss if math.isfinite(test_loss) else None, test_acc=test_acc,
        steps=len(losses), seconds=round(time.perf_counter() - start, 2),
        batch_losses=[round(v, 4) if math.isfinite(v) else None for v in losses], etas=[round(e, 5) for e in etas],
    )


# ---------------------------------------------------------------------------------------------------- study


def configurations(grids: dict[str, list[float]]) -> list[tuple[str, float | None]]:
    return [("agd", None)] + [(name, lr) for name in ("adam", "sgd") for lr in grids[name]]


def summarise(records: list[dict]) -> list[dict]:
    """One row per dataset, depth and method: AGD, Adam and SGD at their default lr, and at their best lr."""
    rows = []
    keys = sorted({(r["dataset"], r["depth"]) for r in records})
    for dataset, depth in keys:
        here = [r for r in records if r["dataset"] == dataset and r["depth"] == depth]

        def stats(runs: list[dict], method: str, lr: float | None) -> dict:
            acc = [r["test_acc"] for r in runs]
            loss = [r["train_loss"] if r["train_loss"] is not None else math.inf for r in runs]
            return dict(dataset=dataset, depth=depth, method=method, lr=lr, seeds=len(runs),
                        test_acc=float(np.mean(acc)), test_acc_std=float(np.std(acc)),
                        train_loss=float(np.mean(loss)))

        rows.append(stats([r for r in here if r["optimizer"] == "agd"], "AGD", None))
        for name in ("adam", "sgd"):
            by_lr = {}
            for r in here:
                if r["optimizer"] == name:
                    by_lr.setdefault(r["lr"], []).append(r)
            if DEFAULT_LR[name] in by_lr:
                rows.append(stats(by_lr[DEFAULT_LR[name]], f"{NAMES[name]} default", DEFAULT_LR[name]))
            if len(by_lr) > 1:
                best = max(by_lr, key=lambda lr: np.mean([r["test_acc"] for r in by_lr[lr]]))
                rows.append(stats(by_lr[best], f"{NAMES[name]} best", best))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| dataset | depth | method | lr | test acc (mean ± sd) | train loss | seeds |", "|---" * 7 + "|"]
    for r in rows:
        lr = "auto" if r["lr"] is None else f"{r['lr']:g}"
        lines.append(f"| {r['dataset']} | {r['depth']} | {r['method']} | {lr} | {100 * r['test_acc']:.1f} ± "
                     f"{100 * r['test_acc_std']:.1f} | {r['train_loss']:.3f} | {r['seeds']} |")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(2, len(datasets), figsize=(5 * len(datasets), 7), squeeze=False)
    styles = {"AGD": ("k", "-"), "Adam default": ("C0", "-"), "Adam best": ("C0", "--"),
              "SGD default": ("C1", "-"), "SGD best": ("C1", "--")}
    for col, dataset in enumerate(datasets):
        for method, (colour, line) in styles.items():
            mine = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
            if not mine:
                continue
            depths = [r["depth"] for r in mine]
            axes[0, col].errorbar(depths, [100 * r["test_acc"] for r in mine], [100 * r["test_acc_std"] for r in mine],
                                  color=colour, ls=line, marker="o", capsize=3, label=method)
            axes[1, col].plot(depths, [min(r["train_loss"], 10.0) for r in mine], color=colour, ls=line, marker="o")
        axes[0, col].set_title(dataset)
        axes[0, col].set_ylabel("test accuracy (%)")
        axes[1, col].set_ylabel("train loss (capped at 10)")
        depths = sorted({r["depth"] for r in rows if r["dataset"] == dataset})
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(depths, [str(d) for d in depths])
            ax.set_xlabel("depth")
        axes[0, col].axhline(10, color="grey", lw=0.5)
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="subsets, depths 2 and 32, one seed, default lrs only")
    parser.add_argument("--datasets", nargs="+", default=["cifar10", "mnist"], choices=["cifar10", "mnist"])
    parser.add_argument("--depths", nargs="+", type=int)
    parser.add_argument("--seeds", type=int, help="number of seeds (0, 1, ...)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--train-size", type=int, help="training subset (default: all)")
    parser.add_argument("--test-size", type=int, help="test subset (default: all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, help="hidden width (default 256; 128 with --quick)")
    parser.add_argument("--adam-lrs", nargs="+", type=float, help=f"Adam's grid (default {LR_GRID['adam']})")
    parser.add_argument("--sgd-lrs", nargs="+", type=float, help=f"SGD's grid (default {LR_GRID['sgd']})")
    parser.add_argument("--from-records", action="store_true", help="no training: summarise --out/records.jsonl")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("NERO_DATA_DIR"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "agd_depth")
    args = parser.parse_args()
    defaults = [DEFAULT_LR["adam"]], [DEFAULT_LR["sgd"]]
    quick = dict(depths=[2, 32], seeds=1, epochs=1, train_size=3000, test_size=2000, width=128)
    quick.update(adam_lrs=defaults[0], sgd_lrs=defaults[1])
    full = dict(depths=[2, 4, 8, 16, 32], seeds=3, epochs=5, train_size=None, test_size=None, width=256)
    full.update(adam_lrs=list(LR_GRID["adam"]), sgd_lrs=list(LR_GRID["sgd"]))
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    records_path = args.out / "records.jsonl"
    if args.from_records:
        records = [json.loads(line) for line in records_path.read_text().splitlines() if line]
    else:
        records = study(args, parser, records_path)
    rows = summarise(records)
    settings = "rebuilt from records.jsonl" if args.from_records else {
        k: v for k, v in vars(args).items() if k not in ("out", "data_dir", "dataset", "from_records")
    }
    (args.out / "summary.json").write_text(json.dumps(dict(settings=settings, rows=rows), indent=1))
    figure(rows, args.out / "agd_depth.png")
    print(table(rows))
    print(f"wrote {records_path}, {args.out / 'summary.json'}, {args.out / 'agd_depth.png'}")


def study(args: argparse.Namespace, parser: argparse.ArgumentParser, records_path: Path) -> list[dict]:
    """Train every configuration, appending each record to ``records_path`` as it finishes."""
    if args.data_dir is None:
        parser.error("give --data-dir or set $NERO_DATA_DIR (the folder with mnist.npz and cifar10_jpeg.npz)")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    records_path.write_text("")
    records = []
    for dataset in args.datasets:
        args.dataset = dataset
        data = load(dataset, Path(args.data_dir), args.train_size, args.test_size)
        for depth in args.depths:
            for seed in range(args.seeds):
                for optimizer, lr in configurations(dict(adam=args.adam_lrs, sgd=args.sgd_lrs)):
                    record = train(data, depth=depth, optimizer=optimizer, lr=lr, seed=seed, args=args)
                    records.append(record)
                    with records_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    print(f"{dataset} depth {depth:2d} seed {seed} {optimizer:4s} lr {lr or 'auto'}: test acc "
                          f"{100 * record['test_acc']:.1f}%, train loss {record['train_loss']}, "
                          f"{record['seconds']}s", flush=True)
    return records


if __name__ == "__main__":
    main()
