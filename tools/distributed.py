"""Data-parallel GvU with PyTorch's own engine: torch.distributed + DistributedDataParallel,
launched by torchrun. gvu.py uses this module only when torchrun launched it (`if ddp:`).

    torchrun --nproc_per_node 8 gvu.py configs/xomni_paper.json --out runs/xomni   # 8 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 gvu.py ...

Every process (rank) holds a full replica of the frozen base and the LoRA adapter. A step's B
prompts are split into contiguous slices of B/W prompts, one per rank; a group of G samples never
straddles ranks, so each rank computes its own advantages exactly as one process would. DDP averages
the LoRA gradients over ranks; rewards and statistics are gathered so that rank 0, the only one that
writes, logs the whole batch.
"""

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from models import InputError


class TrainingForward(torch.nn.Module):
    """The training pass (gvu.image_token_logprobs) as a module, so that DDP sees the forward whose
    gradients it must sync. Rollout and reward need no gradient, so they bypass DDP."""

    def __init__(self, logprobs, policy):
        super().__init__()
        self.logprobs, self.policy = (
            logprobs,
            policy,
        )  # policy: registers the parameters DDP reduces

    def forward(self, prefix_ids, prefix_mask, codes, temperature):
        return self.logprobs(prefix_ids, prefix_mask, codes, temperature)


class DDP:
    """This process's place in torchrun's group: rank, world size, and the collectives gvu_step
    needs. CUDA: one GPU per process (LOCAL_RANK), NCCL; elsewhere gloo (CPU processes)."""

    def __init__(self, batch_prompts):
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if batch_prompts % self.world:  # before the group forms: every rank exits with this line
            raise InputError(
                f"--batch-prompts {batch_prompts} must be divisible by the {self.world} processes"
            )
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" is this process's GPU
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.module = None

    def wrap(self, logprobs, policy):
        """DDP over the LoRA parameters (the only ones with requires_grad). The frozen base is a
        plain replica, identical on every rank (each loads it and seeds the LoRA init alike), hence
        init_sync=False: no broadcast of a 7B base (init_sync needs torch >= 2.6)."""
        self.module = DistributedDataParallel(TrainingForward(logprobs, policy), init_sync=False)

    def logprobs(self, prefix_ids, prefix_mask, codes, temperature, last):
        """The training pass through DDP. Its gradients are all-reduced in the backward of the
        step's last micro-batch only (no_sync for the others: DDP reads it in the forward)."""
        with nullcontext() if last else self.module.no_sync():
            return self.module(prefix_ids, prefix_mask, codes, temperature)

    def local_slice(self, batch):
        """This rank's contiguous B/W prompts of the step's B (rank 0 holds the first ones)."""
        n = len(batch) // self.world
        return batch[self.rank * n : (self.rank + 1) * n]

    def gather(self, x):
        """(n,) on each rank -> (world * n,) in rank order: the order of the one-process batch."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def mean(self, stats):
        """{name: float} averaged over ranks (equal sample counts: the whole-batch mean)."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        t = torch.tensor(list(stats.values()), dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return dict(zip(stats, (t / self.world).tolist()))

    def close(self):
        """Leave the group. DDP holds the group, so it goes first. Then every rank waits at a
        barrier, with the GIL released, while gloo's workers free what they hold: the group's
        destructor joins them while holding the GIL, and a worker that frees a collective's last
        reference needs the GIL, so a rank that tears down right after its last collective can
        hang for good. The barrier's handle is kept until the group is gone."""
        self.module = None
        done = dist.barrier(async_op=True)
        done.wait()
        dist.destroy_process_group()  # the group's last reference: its workers are joined here
        del done
