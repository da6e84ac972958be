"""DDP equivalence: the first steps of an N-rank job must compute what one process computes on the
same global batch.

On each checked step every rank sends rank 0 its batch (the padded images [B, 3, H, W], their mask
and targets, as collated), its random state (dropout), then its gradients after the all-reduce and
before clipping, then its parameters after the optimizer step. Rank 0 restores a replica of the
model and optimizer to the state the step started from and, in one process, runs each rank's
batch as its own sub-batch (DETR pads per batch, so this is the global batch as the ranks saw it)
with the global box normaliser, accumulates the gradients of the ranks' mean loss, clips and steps.

Tolerances, per element, from the per-rank gradients ``g_r`` that the replica computes:
- gradients: ``2 u sum_r |g_r|``. The average of N float32 terms, summed in any order and divided
  by N, is within ``u sum_r |g_r|`` of exact (Higham, ch. 3, first order), and the all-reduce and
  the replica's accumulation both are; on a device whose kernels are not deterministic the
  replica's own run-to-run difference on rank 0's batch is added, in proportion.
- parameters: AdamW's update ``q = m / (sqrt(v) + eps)`` moves by at most about
  ``2 d / (sqrt(v) + eps)`` when the gradient moves by ``d`` (both moments move), and never by more
  than 2; times the group's learning rate. On top, the roundings on either side: one of the new
  parameter and three in the update (``q``, ``lr q``, the sum), ``4 u |p| + 6 u lr |q|``. A 1-ulp
  flip of a parameter alone is up to ``2 u |p|``: half the tolerance.
A margin is the deviation in units of its tolerance: above 1 fails. A sum instead of an average
is off by N - 1 times the gradient, a rank that keeps its local gradient by the ranks' spread:
both are orders of magnitude above 1.
"""
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from detr.engine import weighted_loss
from detr.misc import NestedTensor

U32 = 2.0 ** -24


@dataclass
class StepCheck:
    step: int
    grad_margin: float
    param_margin: float
    worst: Dict[str, Any]  # rank, tensor, what ("gradient" or "parameter"), max_abs, tolerance

    @property
    def passed(self) -> bool:
        return self.grad_margin <= 1.0 and self.param_margin <= 1.0


@dataclass
class DDPEquivalence:
    """Hooks for the train loop: ``before(step, samples, targets)`` before the forward,
    ``after_backward(step)`` before clipping, ``after_step(step)`` after the optimizer step."""

    model: nn.Module  # without the DDP wrapper
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    steps: int
    max_norm: float
    autocast: Callable[[], ContextManager]
    rank: int
    world_size: int
    collective_device: torch.device
    rng_state: Callable[[], Any]
    set_rng_state: Callable[[Any], None]
    checks: List[StepCheck] = field(default_factory=list)
    logged: List[StepCheck] = field(default_factory=list)
    offset: int = 0  # steps done before the current epoch: the hooks get the epoch's own step
    _batches: Optional[List[Any]] = None
    _start: Optional[Dict[str, Any]] = None
    _grads: Optional[List[torch.Tensor]] = None

    def active(self, step: int) -> bool:
        return step + self.offset < self.steps

    def before(self, step: int, samples: NestedTensor, targets: List[Dict[str, torch.Tensor]]) -> None:
        if not self.active(step):
            return
        batch = (samples.tensors.cpu(), samples.mask.cpu(), [{k: v.cpu() for k, v in t.items()} for t in targets],
                 self.rng_state())
        self._batches = _gather_object(batch, self.world_size, self.rank)
        if self.rank == 0:
            self._start = {"model": copy.deepcopy(self.model.state_dict()),
                           "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def after_backward(self, step: int) -> None:
        if self.active(step):
            self._grads = self._gather(_flat_grads(self._params(self.model)))

    def after_step(self, step: int) -> None:
        if not self.active(step):
            return
        params = self._gather(_flat([p.detach() for p in self._params(self.model)]))
        if self.rank == 0:
            self.checks.append(self._judge(step + self.offset, self._grads, params))
        self._batches = self._start = self._grads = None

    def summary(self) -> Dict[str, Any]:
        worst = max(self.checks, key=lambda c: max(c.grad_margin, c.param_margin), default=None)
        return {"checked_steps": [c.step for c in self.checks], "passed": all(c.passed for c in self.checks),
                "worst_grad_margin": max((c.grad_margin for c in self.checks), default=None),
                "worst_param_margin": max((c.param_margin for c in self.checks), default=None),
                "worst": worst.worst if worst else None,
                "steps": [{"step": c.step, "grad_margin": c.grad_margin, "param_margin": c.param_margin, **c.worst}
                          for c in self.checks]}

    @staticmethod
    def _params(model: nn.Module) -> List[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def _gather(self, flat: torch.Tensor) -> Optional[List[torch.Tensor]]:
        """Rank 0 gets every rank's vector (on the CPU); the others None."""
        flat = flat.to(self.collective_device)
        parts = [torch.empty_like(flat) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(flat, parts, dst=0)
        return [p.cpu() for p in parts] if parts is not None else None

    def _replica_grads(self, replica: nn.Module, criterion: nn.Module, index: int) -> torch.Tensor:
        images, mask, targets, rng = self._batches[index]
        device = next(replica.parameters()).device
        self.set_rng_state(rng)
        replica.zero_grad(set_to_none=True)
        with self.autocast():
            outputs = replica(NestedTensor(images.to(device), mask.to(device)))
            losses = criterion(outputs, [{k: v.to(device) for k, v in t.items()} for t in targets])
            loss = weighted_loss(losses, criterion.weight_dict)
        loss.backward()
        return _flat_grads(self._params(replica)).cpu()

    def _judge(self, step: int, grads: List[torch.Tensor], params: List[torch.Tensor]) -> StepCheck:
        replica = copy.deepcopy(self.model)
        replica.load_state_dict(self._start["model"])
        criterion = copy.deepcopy(self.criterion)
        boxes = sum(len(t["labels"]) for batch in self._batches for t in batch[2])
        # the normaliser every rank used: the global count of boxes per rank, at least 1
        criterion.num_boxes = lambda targets, device: max(boxes / self.world_size, 1.0)
        rng = self.rng_state()  # the replica's dropout must not change this rank's own draws
        per_rank = [self._replica_grads(replica, criterion, r) for r in range(self.world_size)]
        again = self._replica_grads(replica, criterion, 0)
        self.set_rng_state(rng)
        spread = float((again - per_rank[0]).abs().max() / per_rank[0].abs().max().clamp(min=1e-30))
        total = torch.stack([g.abs() for g in per_rank]).sum(0)
        grad_tol = (2 * U32 + 2 * spread) * total.double() + 1e-30
        mean = torch.stack(per_rank).double().mean(0)

        params_of = self._params(replica)
        offset = 0
        for p in params_of:
            p.grad = mean[offset:offset + p.numel()].view_as(p).to(p.dtype).clone()
            offset += p.numel()
        optimizer = self.make_optimizer(replica)
        optimizer.load_state_dict(self._start["optimizer"])
        clip = 1.0
        if self.max_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params_of, self.max_norm))
            clip = min(1.0, self.max_norm / (norm + 1e-6))
        optimizer.step()
        after = _flat([p.detach() for p in params_of]).double()
        denom, lr, update = _adam_scale(optimizer, params_of)
        param_tol = lr * torch.clamp(2 * clip * grad_tol / denom, max=2.0) + 4 * U32 * after.abs() \
            + 6 * U32 * lr * update.abs() + 1e-30

        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        sizes = [p.numel() for p in params_of]
        worst = {"grad_margin": 0.0, "param_margin": 0.0}
        found: Dict[str, Any] = {}
        for rank in range(self.world_size):
            for what, got, want, tol in (
                ("gradient", grads[rank], mean, grad_tol),
                ("parameter", params[rank], after, param_tol),
            ):
                ratio = (got.double() - want).abs() / tol
                at = int(ratio.argmax())
                margin = float(ratio[at])
                key = "grad_margin" if what == "gradient" else "param_margin"
                if margin > worst[key]:
                    worst[key] = margin
                if margin >= max(worst.values()):
                    found = {"rank": rank, "what": what, "tensor": _name_at(names, sizes, at),
                             "max_abs": float((got.double() - want).abs()[at]), "tolerance": float(tol[at])}
        return StepCheck(step, worst["grad_margin"], worst["param_margin"], found)


def _flat(tensors: List[torch.Tensor]) -> torch.Tensor:
    """One float32 vector of the tensors, in order."""
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def _flat_grads(params: List[nn.Parameter]) -> torch.Tensor:
    """The parameters' gradients as one float32 vector; a parameter without one counts as zeros."""
    return _flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])


def _adam_scale(optimizer: torch.optim.Optimizer, params: List[nn.Parameter]):
    """(sqrt(v_hat) + eps, lr, the update m_hat / (sqrt(v_hat) + eps)) per element, as flat float64
    vectors, from AdamW's state after a step."""
    denoms, lrs, updates = [], [], []
    for group in optimizer.param_groups:
        (beta1, beta2), eps = group["betas"], group["eps"]
        for p in group["params"]:
            if not p.requires_grad:
                continue
            state = optimizer.state[p]
            t = float(state["step"])
            denom = (state["exp_avg_sq"].double() / (1 - beta2 ** t)).sqrt() + eps
            denoms.append(denom.reshape(-1))
            updates.append((state["exp_avg"].double() / (1 - beta1 ** t) / denom).reshape(-1))
            lrs.append(torch.full((p.numel(),), float(group["lr"]), dtype=torch.float64))
    order = {id(p): i for i, p in enumerate(q for g in optimizer.param_groups for q in g["params"] if q.requires_grad)}
    index = [order[id(p)] for p in params]
    return tuple(torch.cat([parts[i] for i in index]) for parts in (denoms, lrs, updates))


def _name_at(names: List[str], sizes: List[int], index: int) -> str:
    for name, size in zip(names, sizes):
        if index < size:
            return name
        index -= size
    return "?"


def _gather_object(obj: Any, world_size: int, rank: int) -> Optional[List[Any]]:
    out = [None] * world_size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
