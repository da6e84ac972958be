"""torch.distributed set-up for ``torchrun`` jobs: the process group, collectives on host numbers,
and where each rank is when one of them times out.

The collective library of each device type, and the device its collectives run on, come from
:mod:`runtime.device`, so a vendor's device needs only its backend registered (or its plugin imported).
"""
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

from .device import backend_for, collective_device
from .files import atomic_write, remove_temporaries


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


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
    """The process's place in a torchrun job (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); one process
    without them."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    return DistInfo(
        rank=int(env.get("RANK", "0")),
        world_size=world,
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
    )


def default_backend(device_type: str) -> str:
    """The collective library the device type ships with; gloo for the CPU and anything unknown."""
    return backend_for(device_type).dist_backend


def init_distributed(info: DistInfo, device: torch.device, backend: Optional[str], timeout_s: float) -> Optional[str]:
    """Joins the process group (env:// rendezvous) when the job has more than one rank; returns the backend.

    ``timeout_s`` bounds every collective, so a rank that hangs makes the others fail instead of waiting forever.
    """
    if not info.enabled:
        return None
    backend = backend or default_backend(device.type)
    kwargs = {"device_id": device} if backend_for(device.type).accelerator and backend != "gloo" else {}
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    except TypeError:  # torch < 2.3 has no device_id
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return backend


def shutdown() -> None:
    if _initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if _initialized():
        dist.barrier()


def all_reduce(values: List[float], op: str = "sum") -> List[float]:
    """Sums (or takes the max of) a few host numbers over all ranks."""
    if not _initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() != "gloo":
        t = t.to(collective_device(dist.get_backend()))
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_gather_object(obj: Any) -> List[Any]:
    if not _initialized():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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


class Progress:
    """Where this rank is, in ``<folder>/ranks/rank<R>.json`` (step, phase and time, replaced at each
    phase), so that after a collective timeout the ranks that never arrived can be named."""

    def __init__(self, folder: Path, rank: int, world_size: int = 1):
        self.folder = Path(folder) / "ranks"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.path = self.folder / f"rank{rank}.json"
        self.last: dict = {}
        stale = [self.path, self.folder / f"rank{rank}.timeout.json"]
        if rank == 0:  # marks of an earlier run with more ranks
            stale += [p for p in self.folder.glob("rank*.json") if _rank_of(p) >= world_size]
        for path in stale:
            path.unlink(missing_ok=True)
        remove_temporaries(self.folder, f"rank{rank}.*")  # a mark being written when the rank was killed

    def mark(self, step: int, phase: str) -> None:
        self.last = {"rank": self.rank, "step": step, "phase": phase, "time": time.time()}
        atomic_write(self.path, json.dumps(self.last), durable=False)

    def positions(self) -> List[dict]:
        """Every rank's last mark that can be read."""
        found = []
        for path in sorted(self.folder.glob("rank*.json")):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return found

    def report_timeout(self, error: BaseException, order: Sequence[str]) -> dict:
        """Writes ``rank<R>.timeout.json``: where this rank waited and the ranks behind it (in
        ``order`` of phases), which are the ones it was waiting for."""
        def position(mark: dict) -> tuple:
            phase = mark.get("phase")
            return (mark.get("step", -1), order.index(phase) if phase in order else -1)

        behind = [m for m in self.positions() if m.get("rank") != self.rank and position(m) < position(self.last)]
        report = {**self.last, "error": str(error).splitlines()[0][:300] if str(error) else type(error).__name__,
                  "not_arrived": behind}
        (self.folder / f"rank{self.rank}.timeout.json").write_text(json.dumps(report))
        return report


def _rank_of(path: Path) -> int:
    m = re.match(r"rank(\d+)\.", path.name)
    return int(m.group(1)) if m else -1


def is_collective_timeout(error: BaseException) -> bool:
    """True for the errors gloo, NCCL and the c10d store raise when a collective waits too long."""
    text = f"{type(error).__name__}: {error}"
    return bool(re.search(r"timed? ?out|timeout", text, re.I)) and (
        "DistBackendError" in text or "gloo" in text.lower() or "nccl" in text.lower() or "collective" in text.lower()
        or "recv" in text or "send" in text or isinstance(error, getattr(dist, "DistError", ())))


def die_with_parent() -> None:
    """Under torchrun, asks Linux to kill this rank when its parent (the launcher) dies, so that a
    ``kill -9`` of the launcher leaves no rank training as an orphan."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request was made
        os.kill(os.getpid(), signal.SIGKILL)
