"""Train a small CNN with SyncBatchNorm in DistributedDataParallel, on the CPU.

    torchrun --nproc-per-node 2 examples/ddp_train.py

Each rank holds a different number of samples (rank r gets 4 + 2·r images): the batch
statistics are those of the global batch all the same. Gloo on the CPU, NCCL when every rank has
a GPU. At the end the ranks check that their running statistics agree.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import batchnorm


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False),
        batchnorm.BatchNorm2d(32, activation="relu"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else \
        torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = batchnorm.convert_sync_batchnorm(make_model()).to(device)
    model = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    sizes = [4 + 2 * r for r in range(world)]  # uneven per-rank batches
    total = sum(sizes)
    gen = torch.Generator().manual_seed(1000 + rank)
    for step in range(args.steps):
        x = torch.randn(sizes[rank], 3, 16, 16, generator=gen).to(device)
        target = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0].mean((1, 2)) > 0).long()
        loss = nn.functional.cross_entropy(model(x), target.to(device), reduction="sum")
        opt.zero_grad()
        # DDP averages gradients over ranks; this scaling makes it the global mean loss's.
        (loss * world / total).backward()
        opt.step()
        summed = loss.detach().clone()
        dist.all_reduce(summed)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  mean loss over {total} images on {world} ranks: "
                  f"{float(summed) / total:.4f}")

    bn = [m for m in model.modules() if isinstance(m, batchnorm.SyncBatchNorm)]
    mine = torch.cat([m.running_mean for m in bn] + [m.running_var for m in bn])
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    if rank == 0:
        print(f"{len(bn)} SyncBatchNorm layers; running statistics identical on all ranks: {same}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
