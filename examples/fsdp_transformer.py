"""A small character transformer on tiny Shakespeare, sharded with FSDP2 and trained with Nero.

    torchrun --standalone --nproc_per_node=2 examples/fsdp_transformer.py --steps 50

Every weight is a DTensor sharded by rows (``Shard(0)``) across the processes; Nero updates each rank's rows where
they are, with no communication of its own after the first step (see docs/distributed.md). CPU processes talk
over gloo, GPUs (one per process) over NCCL. Across machines, start the same command on each one with the
machine count, its rank and the first machine's address (the data file must be on every machine)::

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \\
        examples/fsdp_transformer.py --steps 2000      # and --node_rank=1 on the second machine

Prints the training loss (the mean over ranks) every few steps and the validation loss at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F

import nero_torch
from harness import data
from harness.models import CharTransformer


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32, help="sequences per process and step")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="folder with tinyshakespeare.txt (else $NERO_DATA_DIR)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    return parser.parse_args(argv)


def batch(ids: torch.Tensor, size: int, context: int, gen: torch.Generator, device: torch.device):
    start = torch.randint(0, len(ids) - context - 1, (size,), generator=gen)
    window = torch.stack([ids[s : s + context + 1] for s in start.tolist()]).to(device)
    return window[:, :-1], window[:, 1:]


def mean_over_ranks(x: torch.Tensor) -> float:
    x = x.detach().clone()
    dist.all_reduce(x)
    return x.item() / dist.get_world_size()


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if gpu else "gloo")  # torchrun sets RANK, WORLD_SIZE and the rendezvous
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    # The model's logits are a view of the head's matmul; FSDP2 warns in case one modifies them in place (not here).
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    train_ids, val_ids, vocabulary = data.shakespeare(args.data_dir)
    torch.manual_seed(args.seed)  # the same initial weights on every rank: fully_shard keeps each its own rows
    model = CharTransformer(len(vocabulary), args.context, width=args.width, layers=args.layers).to(device)
    for block in model.blocks.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = nero_torch.Nero(nero_torch.param_groups(model), lr=args.lr)  # after fully_shard: its DTensor params

    def loss_on(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    validation = batch(val_ids, args.batch, args.context, torch.Generator().manual_seed(1000 + rank), device)
    with torch.no_grad():
        start_val = mean_over_ranks(loss_on(*validation))
    if rank == 0:
        sizes = sum(p.numel() for p in model.parameters())
        print(f"{world} processes, {sizes} parameters sharded by rows; validation loss {start_val:.3f}", flush=True)
    gen = torch.Generator().manual_seed(args.seed + 1 + rank)  # each rank its own batches: data parallel
    every, began = max(1, args.steps // 10), time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = loss_on(*batch(train_ids, args.batch, args.context, gen, device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean = mean_over_ranks(loss)
        if rank == 0 and (step % every == 0 or step == 1):
            print(f"step {step:5d}  loss {mean:.3f}", flush=True)
    with torch.no_grad():
        end_val = mean_over_ranks(loss_on(*validation))
    if rank == 0:
        seconds = time.perf_counter() - began
        print(f"validation loss {start_val:.3f} -> {end_val:.3f} in {args.steps} steps ({seconds:.1f} s)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
