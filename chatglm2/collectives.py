"""Tensor-parallel plumbing: process group set-up under torchrun and the few collectives the model needs."""
import os
import signal
import sys
import time
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from chatglm2.errors import InputError

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
ERROR_EXIT_WAIT_S = 5  # how long a rank other than 0 waits for rank 0 to report an error they share


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def check_tp_size(tp_size: int) -> None:
    world_size = launched_world_size()
    if tp_size < 1:
        raise InputError(f"--tp_size must be at least 1, got {tp_size}")
    if tp_size != world_size:
        raise InputError(f"--tp_size {tp_size} does not match the {world_size} process(es) started; "
                         f"launch with torchrun --nproc_per_node {tp_size}")


def init_tensor_parallel(tp_size: int, device: torch.device, timeout_s: int = 600) -> int:
    """Join the torchrun process group on `device`'s backend; returns this process's tp_rank. Every collective
    waits at most timeout_s, so a dead rank ends the run instead of hanging it."""
    check_tp_size(tp_size)
    if tp_size == 1:
        return 0
    if not dist.is_initialized():
        dist.init_process_group(BACKENDS[device.type], timeout=timedelta(seconds=timeout_s),
                                rank=launched_rank(), world_size=tp_size)
    return dist.get_rank()


def is_tp() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_rank0() -> bool:
    return not is_tp() or dist.get_rank() == 0


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (cli turns, sampling seeds, web requests); identity without TP."""
    if not is_tp():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_ranks_max(value: float) -> float:
    """The largest `value` over ranks (the reference reports the slowest rank's timing)."""
    if not is_tp():
        return value
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return max(values)


def shutdown() -> None:
    """Leave the group together, then end the process without interpreter finalization: gloo's worker threads can
    still hold tensors then, and freeing them during finalization aborts the process (pytorch/pytorch#179291)."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def exit_on_error(message: str, status: int) -> NoReturn:
    """Print `message` on stderr once and end with `status`, on every rank.

    Under torchrun, ranks that stop on the same bad input get here together: rank 0 prints and exits at once; the others
    wait for the SIGTERM that torchrun sends when it sees rank 0 end, and answer it with the same status, so torchrun
    reports that status for every rank (not -15 for the slower ones) and the message is out first. A rank whose error
    is its own (rank 0 does not end) prints it itself after ERROR_EXIT_WAIT_S. torchrun then prints its ChildFailedError
    summary, which no worker can suppress. os._exit skips interpreter finalization, which can abort while gloo's
    threads still hold tensors (see shutdown).
    """
    rank = launched_rank()
    if launched_world_size() > 1:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(status))
        if rank != 0:
            time.sleep(ERROR_EXIT_WAIT_S)
            message = f"{message} (rank {rank})"
    print(message, file=sys.stderr, flush=True)
    if launched_world_size() == 1:
        sys.exit(status)
    sys.stdout.flush()
    os._exit(status)
