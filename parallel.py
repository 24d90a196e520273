"""Data parallelism with torch.distributed, for `torchrun --nproc_per_node=N train.py`: each rank samples and scores
its share of a step's questions, one all_reduce sums the gradients, every rank takes the same optimizer step (the
weights never drift apart), rank 0 logs and saves; plain `python train.py` is rank 0 of 1. No DDP: NRT's forward is
`token_logprobs`, not `model.forward`. Left out: FSDP/ZeRO, gradient bucketing, tensor or pipeline parallelism.
"""
import os
import signal
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed(device):
    """(rank, world, device): under torchrun join the process group, nccl with one GPU per process, gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    # others wait while rank 0 alone evaluates and saves: a long timeout (nccl's is 10 minutes) tells that from a hang
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=3))
    return dist.get_rank(), dist.get_world_size(), device


def any_rank(flag: bool, world: int) -> bool:
    """True on every rank if it is true on any (so all ranks stop at the same step)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_grads(model, world):
    """Sum every trained parameter's gradient over the ranks (a rank without one adds zeros)."""
    for p in (p for p in model.parameters() if p.requires_grad and world > 1):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def stop_on_signals():
    """Ctrl-C or SIGTERM (kill, a scheduler's preemption) sets the returned dict's "signal": the loop finishes
    its step, saves and exits 128 + signum; a second signal aborts at once, without saving."""
    stop = {}

    def on_signal(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop["signal"] = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving (again to abort)", flush=True)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop


def barrier(world):
    """Every rank waits here until all have arrived (e.g. while rank 0 writes a checkpoint)."""
    if world > 1:
        dist.barrier()


def finish_distributed(world):
    if world > 1:
        dist.barrier()  # rank 0 may still be saving
        dist.destroy_process_group()
