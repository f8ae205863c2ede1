"""Data-parallel GvU with PyTorch's own engine: torch.distributed + DistributedDataParallel, launched by torchrun.

    torchrun --nproc_per_node 8 gvu.py configs/xomni_paper.json --out runs/xomni     # one node, 8 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 gvu.py ...  # each node

Every process (rank) holds a full replica of the frozen base and the LoRA adapter. A step's B prompts are split
into contiguous slices of B/N prompts, one per rank; a group of G samples never straddles ranks, so each rank
computes its own advantages exactly as one process would (--dynamic-sampling refills each rank's B/N groups from
its own slice of the reserve, so ranks may roll out different numbers of batches in a step). DDP averages the
LoRA gradients over ranks; rewards and statistics are gathered so that rank 0, the only one that writes, logs
the whole batch.
Plain `python gvu.py` starts no process group, and every function here is then a no-op.
"""

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from models.adapters import InputError


def setup(batch_prompts):
    """Join torchrun's process group if launched by it. Returns (rank, world, is_main).
    CUDA: one GPU per process (LOCAL_RANK), NCCL; elsewhere gloo, e.g. CPU processes."""
    if "RANK" not in os.environ:  # plain `python gvu.py`
        return 0, 1, True
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if batch_prompts % world:  # checked before the group forms: every rank exits with the same line
        raise InputError(
            f"--batch-prompts {batch_prompts} must be divisible by the {world} processes"
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" now means this process's GPU
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, rank == 0


def local_slice(batch, rank, world):
    """This rank's contiguous B/N prompts of the step's B (rank 0 holds the first ones)."""
    n = len(batch) // world
    return batch[rank * n : (rank + 1) * n]


class TrainingForward(torch.nn.Module):
    """The training pass (gvu.image_token_logprobs) as a module, so that DDP sees the forward it must sync.
    The rollout and the reward call umm.hidden_states directly; they need no gradient, so they bypass DDP."""

    def __init__(self, logprobs, policy):
        super().__init__()
        self.logprobs, self.policy = (
            logprobs,
            policy,
        )  # policy: registers the parameters DDP reduces

    def forward(self, prefix_ids, prefix_mask, codes, temperature):
        return self.logprobs(prefix_ids, prefix_mask, codes, temperature)


def wrap(logprobs, policy):
    """DDP over the LoRA parameters (the only ones with requires_grad; the frozen base is a plain replica,
    identical on every rank because every rank loads it and seeds the LoRA init alike, hence init_sync=False:
    no 14 GB broadcast of a 7B base; init_sync needs torch >= 2.6)."""
    if not dist.is_initialized():
        return None
    return DistributedDataParallel(TrainingForward(logprobs, policy), init_sync=False)


def gather(x):
    """(n,) on each rank -> (world * n,) in rank order, i.e. the order of the one-process batch."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def mean_over_ranks(stats, device):
    """{name: float} averaged over ranks (ranks hold equal sample counts, so this is the whole-batch mean)."""
    if not dist.is_initialized():
        return stats
    t = torch.tensor(list(stats.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(stats, (t / dist.get_world_size()).tolist()))


def teardown():
    """Leave the process group; the caller has dropped its DDP first, so that the group is destroyed here.
    Why the care: the group's destructor joins gloo's worker threads while holding the GIL, and a worker that frees
    a collective's last reference needs the GIL (the tensors and the thread-local state it holds are Python
    objects). A rank that tore down a few ms after its last collective hung there for good (about 1 launch in 7 of
    test_ddp's under load). So every rank first waits at a barrier, with the GIL released, while its workers free
    what they hold; the barrier's own handle is kept until the group is gone, so no worker ever frees it."""
    if dist.is_initialized():
        done = dist.barrier(async_op=True)
        done.wait()
        dist.destroy_process_group()  # the group's last reference: its worker threads are joined here
        del done
