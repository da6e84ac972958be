"""One training epoch and one evaluation pass, with progress lines and honest timers.

``core_time`` covers forward, loss, backward, clipping and the optimizer step only, with the
device synchronised around it (FlagPerf's p_core); data loading and host copies are outside it.
"""
import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from runtime import compat

from .coco_eval import CocoEvaluator
from .misc import NonFiniteError
from .recipe import REFERENCE


def no_sync() -> None:
    """The CPU needs no synchronisation; accelerators pass their own."""


@dataclass
class EpochStats:
    samples: int = 0
    steps: int = 0
    wall_time: float = 0.0
    core_time: float = 0.0
    losses: Dict[str, float] = field(default_factory=dict)
    step_losses: List[float] = field(default_factory=list)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf: training stops at once, naming the step and the terms."""


def _timed(fn: Callable, *args) -> float:
    """Calls ``fn(*args)``; returns the seconds it took."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def to_device(samples, targets, device: torch.device):
    samples = samples.to(device, non_blocking=True)
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return samples, targets


def weighted_loss(losses: Dict[str, torch.Tensor], weight_dict: Dict[str, float]) -> torch.Tensor:
    return sum(losses[k] * w for k, w in weight_dict.items() if k in losses)


def check_finite(loss: torch.Tensor, losses: Dict[str, torch.Tensor], step: int, epoch: int) -> float:
    value = loss.item()
    if not math.isfinite(value):
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items() if not math.isfinite(v.item()))
        raise NonFiniteLossError(f"loss is {value} at epoch {epoch} step {step}; non-finite terms: {terms or 'none (the sum overflowed)'}")
    return value


# The phases of a training step, in order: a rank that hangs is found as the one behind the others.
PHASES = ("forward and loss", "backward and gradient all-reduce", "clipping and optimizer step")


def cast_floating(outputs: Any, dtype: torch.dtype) -> Any:
    """``outputs`` (nested dicts and lists of tensors) with every floating tensor cast to ``dtype``."""
    return compat.tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, outputs)


def train_step(
    model: nn.Module,
    criterion: nn.Module,
    samples: Any,
    targets: List[Dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    max_norm: float = REFERENCE.clip_max_norm,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    scaler: Optional["torch.amp.GradScaler"] = None,
    loss_dtype: Optional[torch.dtype] = None,
    check: Optional[Callable[[torch.Tensor, Dict[str, torch.Tensor]], None]] = None,
    mark: Optional[Callable[[str], None]] = None,
    after_backward: Optional[Callable[[], None]] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One step of the reference recipe: forward and set criterion under ``autocast()``, backward
    (scaled by ``scaler`` when given), gradients clipped to a total norm of ``max_norm`` (0: not
    clipped), then the optimizer step.

    ``samples`` is what the model takes (a NestedTensor [B, 3, H, W] or a list of images [3, H, W]);
    ``loss_dtype`` casts the model's outputs before the criterion (a model run in half precision
    still has its loss in float32); ``check(loss, losses)`` runs before backward, so that a NaN
    can be stopped before it reaches the weights or a checkpoint; ``mark(phase)`` is called before
    each of :data:`PHASES`; ``after_backward()`` sees the (all-reduced, unscaled) gradients before
    clipping. Returns the weighted loss (a scalar) and the criterion's terms.
    """
    mark = mark or (lambda phase: None)
    mark(PHASES[0])
    with autocast():
        outputs = model(samples)
        if loss_dtype is not None:
            outputs = cast_floating(outputs, loss_dtype)
        losses = criterion(outputs, targets)
        loss = weighted_loss(losses, criterion.weight_dict)
    if check is not None:
        check(loss, losses)
    optimizer.zero_grad(set_to_none=True)
    mark(PHASES[1])
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if after_backward is not None:
        after_backward()
    mark(PHASES[2])
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss, losses


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    max_norm: float = REFERENCE.clip_max_norm,
    autocast_dtype: Optional[torch.dtype] = None,
    scaler: Optional["torch.amp.GradScaler"] = None,
    synchronize: Callable[[], None] = no_sync,
    max_steps: Optional[int] = None,
    log_every: int = 10,
    log: Callable[[str], None] = print,
    after_step: Optional[Callable[[], None]] = None,
    progress: Optional[Callable[[int, str], None]] = None,
    checks: Optional[Any] = None,
    pause: Optional[Callable[[int, EpochStats], bool]] = None,
) -> EpochStats:
    """Trains over ``data_loader`` (batches of (NestedTensor, targets)), at most ``max_steps`` steps.

    ``after_step`` runs after every optimizer step, e.g. a per-step learning-rate warm-up;
    ``progress(step, phase)`` is told where the step is, before each phase (see :data:`PHASES`).
    ``checks`` (e.g. :class:`training.ddp_check.DDPEquivalence`) has ``before(step, samples, targets)``,
    ``after_backward(step)`` and ``after_step(step)``; their time is left out of the step's timings.
    ``pause(step, stats)`` runs after each step with the epoch's figures so far (e.g. an evaluation
    every N steps); its time is left out of the epoch's, and when it returns True the epoch ends.
    """
    mark = progress or (lambda step, phase: None)
    model.train()
    criterion.train()
    stats = EpochStats()
    sums: Dict[str, float] = {}
    total_steps = len(data_loader) if max_steps is None else min(max_steps, len(data_loader))
    start = time.perf_counter()
    check_time, checks_in_step = 0.0, []
    for step, (samples, targets) in enumerate(data_loader):
        if step >= total_steps:
            break
        samples, targets = to_device(samples, targets, device)
        checked = 0.0
        if checks is not None:
            checked += _timed(checks.before, step, samples, targets)
        synchronize()
        t0 = time.perf_counter()
        try:
            loss, losses = train_step(
                model, criterion, samples, targets, optimizer, max_norm,
                autocast=lambda: torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None),
                scaler=scaler, check=lambda loss, losses: check_finite(loss, losses, step, epoch),
                mark=lambda phase: mark(step, phase),
                after_backward=None if checks is None else lambda: checks_in_step.append(_timed(checks.after_backward, step)))
        except NonFiniteError as exc:  # raised by the matcher for non-finite predictions
            raise NonFiniteLossError(f"epoch {epoch} step {step}: {exc}") from exc
        synchronize()
        stats.core_time += time.perf_counter() - t0 - sum(checks_in_step)
        checked += sum(checks_in_step)
        checks_in_step.clear()
        if checks is not None:
            checked += _timed(checks.after_step, step)
        check_time += checked
        value = loss.item()
        if after_step is not None:
            after_step()
        stats.samples += len(targets)
        stats.steps += 1
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        sums["loss"] = sums.get("loss", 0.0) + value
        stats.step_losses.append(value)
        if log_every and (step % log_every == 0 or step + 1 == total_steps):
            elapsed = time.perf_counter() - start
            eta = elapsed / (step + 1) * (total_steps - step - 1)
            log(
                f"epoch {epoch} step {step + 1}/{total_steps} loss {value:.4f} "
                f"(ce {losses['loss_ce'].item():.3f} bbox {losses['loss_bbox'].item():.3f} giou {losses['loss_giou'].item():.3f}) "
                f"{stats.samples / elapsed:.1f} img/s eta {eta:.0f}s"
            )
        if pause is not None:
            stats.wall_time = time.perf_counter() - start - check_time
            t0 = time.perf_counter()
            stop = pause(step, stats)
            check_time += time.perf_counter() - t0
            if stop:
                break
    stats.wall_time = time.perf_counter() - start - check_time
    stats.losses = {k: v / max(stats.steps, 1) for k, v in sums.items()}
    return stats


@torch.no_grad()
def evaluate(
    model: nn.Module,
    postprocess: nn.Module,
    data_loader: Iterable,
    coco_gt,
    device: torch.device,
    autocast_dtype: Optional[torch.dtype] = None,
) -> Dict[str, object]:
    """COCO bbox evaluation of the model on ``data_loader``: pycocotools' 12 stats, AP = stats[0].

    Under torch.distributed each rank passes its own share of the images; the detections are
    gathered so that every rank returns the same summary of the whole set.
    """
    model.eval()
    evaluator = CocoEvaluator(coco_gt)
    for samples, targets in data_loader:
        samples = samples.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            outputs = model(samples)
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        results = postprocess({k: outputs[k].float() for k in ("pred_logits", "pred_boxes")}, orig_sizes)
        evaluator.update({int(t["image_id"]): {k: v.cpu() for k, v in r.items()} for t, r in zip(targets, results)})
    evaluator.synchronize_between_processes()
    return evaluator.summarize()
