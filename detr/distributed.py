"""torch.distributed set-up for ``torchrun`` jobs, and the device calls the trainer needs.

Works with any device type torch knows (cuda, xpu, npu, mlu, musa, ...) through the per-backend
module ``torch.<type>``, so a vendor's device needs only its plugin imported first.
"""
import os
import resource
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from .misc import is_dist_avail_and_initialized

# The collective library each device type ships with; gloo for the CPU and anything unknown.
BACKENDS = {"cuda": "nccl", "xpu": "xccl", "npu": "hccl", "mlu": "cncl", "musa": "mccl", "cpu": "gloo"}


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    """The process's place in a torchrun job (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); 1 process without them."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    return DistInfo(
        rank=int(env.get("RANK", "0")),
        world_size=world,
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
    )


def default_backend(device_type: str) -> str:
    return BACKENDS.get(device_type, "gloo")


def init_distributed(info: DistInfo, device: torch.device, backend: Optional[str], timeout_s: float) -> Optional[str]:
    """Joins the process group (env:// rendezvous) when the job has more than one rank; returns the backend.

    ``timeout_s`` bounds every collective, so a rank that hangs makes the others fail instead of waiting forever.
    """
    if not info.enabled:
        return None
    backend = backend or default_backend(device.type)
    kwargs = {"device_id": device} if device.type != "cpu" and backend != "gloo" else {}
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    except TypeError:  # torch < 2.3 has no device_id
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return backend


def shutdown() -> None:
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work, so that timers measure the work and not its launch."""
    module = getattr(torch, device.type, None)
    if device.type != "cpu" and module is not None and hasattr(module, "synchronize"):
        module.synchronize()


def peak_memory_gib(device: torch.device) -> Optional[float]:
    """Peak memory allocated by torch on the device; on the CPU the process's peak resident size."""
    if device.type == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    module = getattr(torch, device.type, None)
    if module is not None and hasattr(module, "max_memory_allocated"):
        return module.max_memory_allocated(device) / 2**30
    return None


def total_memory_gib(device: torch.device) -> Optional[float]:
    """The device's memory; on the CPU the machine's physical memory."""
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        except (ValueError, OSError, AttributeError):
            return None
    module = getattr(torch, device.type, None)
    try:
        return module.get_device_properties(device).total_memory / 2**30
    except Exception:
        return None


def all_reduce(values: List[float], op: str = "sum") -> List[float]:
    """Sums (or takes the max of) a few host numbers over all ranks."""
    if not is_dist_avail_and_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() != "gloo":
        t = t.to(_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_gather_object(obj: Any) -> List[Any]:
    if not is_dist_avail_and_initialized():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _collective_device() -> torch.device:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return torch.device(accelerator.current_accelerator().type, accelerator.current_device_index())
    return torch.device("cuda", torch.cuda.current_device())


def process_start_time() -> float:
    """Wall-clock time (time.time()) when this process started, from /proc where there is one."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()
