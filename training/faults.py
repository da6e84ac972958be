"""Faults a training run can be told to inject (``--fail-at``), so that the harness's handling of a
crashed rank, a NaN loss, a hung collective and a failed evaluation can itself be tested, and so
that the DDP equivalence check can be shown to catch a wrong gradient all-reduce."""
import math
import time
from dataclasses import dataclass
from typing import Dict

import torch
from torch import Tensor, nn

from runtime.faultspec import kinds_help, parse_kind

KINDS = {
    "crash": "crash: the rank raises at that step",
    "nan": "nan: the rank's loss_giou becomes NaN at that step",
    "hang": "hang: the rank sleeps for good at that step (a hung collective for the others)",
    "eval-crash": "eval-crash: the rank raises in the first evaluation after that step",
    "grad-sum": "grad-sum: the rank's gradient all-reduce sums instead of averaging, at that step",
    "grad-local": "grad-local: the rank keeps its own gradient instead of the all-reduced one, at that step",
}
# Faults of the gradient all-reduce, injected by a DDP communication hook rather than the criterion.
GRAD_KINDS = ("grad-sum", "grad-local")


@dataclass(frozen=True)
class TrainFault:
    rank: int
    step: int
    kind: str

    @classmethod
    def parse(cls, spec: str) -> "TrainFault":
        """``RANK:STEP:KIND``, e.g. ``3:5:crash``; STEP counts training steps from 0 over the whole run.
        ``eval-crash`` crashes the first evaluation after step STEP instead of the step itself;
        ``grad-sum`` makes that rank's all-reduce sum the gradients instead of averaging them, and
        ``grad-local`` makes it keep its own gradient, at that step."""
        parts = spec.split(":")
        if len(parts) != 3 or not all(p.isdigit() for p in parts[:2]):
            raise ValueError(f"--fail-at {spec!r}: expected RANK:STEP:KIND with KIND one of {kinds_help(KINDS)}")
        kind, _, _ = parse_kind(parts[2], KINDS, spec, label="--fail-at")
        return cls(int(parts[0]), int(parts[1]), kind)


class FaultyCriterion(nn.Module):
    """Wraps a criterion; on ``fault.rank`` at training step ``fault.step`` it crashes, hangs, or
    makes ``loss_giou`` NaN. Other ranks and steps pass through unchanged."""

    def __init__(self, criterion: nn.Module, fault: TrainFault, rank: int, first_step: int = 0):
        super().__init__()
        self.criterion = criterion
        self.weight_dict = criterion.weight_dict
        self.fault = fault
        self.rank = rank
        self.step = first_step

    def forward(self, outputs, targets) -> Dict[str, Tensor]:
        losses = self.criterion(outputs, targets)
        step, self.step = self.step, self.step + 1
        if self.rank != self.fault.rank or step != self.fault.step or self.fault.kind not in ("crash", "hang", "nan"):
            return losses
        if self.fault.kind == "crash":
            raise RuntimeError(f"injected crash on rank {self.rank} at step {step} (--fail-at)")
        if self.fault.kind == "hang":
            time.sleep(10**6)
        losses["loss_giou"] = losses["loss_giou"] * torch.tensor(math.nan, device=losses["loss_giou"].device)
        return losses


class FaultyAllReduce:
    """:meth:`hook` is a DDP communication hook that averages gradient buckets as DDP does, except on
    ``fault.rank`` at ``fault.step`` (set :attr:`step` before each step): ``grad-sum`` returns the
    sum of the ranks' gradients, ``grad-local`` the rank's own. The rank still joins the collective,
    so the others do not wait."""

    def __init__(self, fault: TrainFault, rank: int, world_size: int):
        self.fault, self.rank, self.world_size = fault, rank, world_size
        self.step = -1

    def hook(self, state, bucket):
        import torch.distributed as dist

        tensor = bucket.buffer()
        wrong = self.rank == self.fault.rank and self.step == self.fault.step
        local = tensor.clone() if wrong and self.fault.kind == "grad-local" else None
        tensor.div_(self.world_size)
        future = dist.all_reduce(tensor, async_op=True).get_future()

        def reduced(done):
            out = done.value()[0]
            if wrong and self.fault.kind == "grad-sum":
                out.mul_(self.world_size)
            elif local is not None:
                out.copy_(local)
            return out

        return future.then(reduced)
