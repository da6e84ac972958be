"""One training epoch and one evaluation pass, with progress lines and honest timers.

``core_time`` covers forward, loss, backward, clipping and the optimizer step only, with the
device synchronised around it (FlagPerf's p_core); data loading and host copies are outside it.
"""
import contextlib
import functools
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
        raise NonFiniteLossError(f"loss is {value} at epoch {epoch} step {step}; "
                                 f"non-finite terms: {terms or 'none (the sum overflowed)'}")
    return value


# The phases of a training step, in order: a rank that hangs is found as the one behind the others.
PHASES = ("forward and loss", "backward and gradient all-reduce", "clipping and optimizer step")


def cast_floating(outputs: Any, dtype: torch.dtype) -> Any:
    """``outputs`` (nested dicts and lists of tensors) with every floating tensor cast to ``dtype``."""
    return compat.tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, outputs)


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


@dataclass
class StepOptions:
    """How :func:`train_one_epoch` runs its steps beyond the reference's arguments, and whom it tells.

    ``autocast_dtype`` (None: float32) and ``scaler`` (float16's loss scaling) are the step's precision;
    ``synchronize`` waits for the device around the timed part; ``max_steps`` ends the epoch early.
    ``after_step()`` runs after every optimizer step, e.g. a per-step learning-rate warm-up;
    ``progress(step, phase)`` is told where the step is, before each phase (see :data:`PHASES`).
    ``checks`` (e.g. :class:`training.ddp_check.DDPEquivalence`) has ``before(step, samples, targets)``,
    ``after_backward(step)`` and ``after_step(step)``; their time is left out of the step's timings.
    ``pause(step, stats)`` runs after each step with the epoch's figures so far (e.g. an evaluation
    every N steps); its time is left out of the epoch's, and when it returns True the epoch ends.
    """

    autocast_dtype: Optional[torch.dtype] = None
    scaler: Optional["torch.amp.GradScaler"] = None
    synchronize: Callable[[], None] = no_sync
    max_steps: Optional[int] = None
    after_step: Optional[Callable[[], None]] = None
    progress: Optional[Callable[[int, str], None]] = None
    checks: Optional[Any] = None
    pause: Optional[Callable[[int, EpochStats], bool]] = None


@dataclass
class _Tally:
    """An epoch's running figures: ``stats``, the sums of the loss terms, and its clock, from which
    the time of the checks and pauses (``excluded``, seconds) is taken out."""

    total_steps: int
    stats: EpochStats = field(default_factory=EpochStats)
    sums: Dict[str, float] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)
    excluded: float = 0.0

    def wall_time(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    def count(self, value: float, losses: Dict[str, torch.Tensor], batch_size: int) -> None:
        """Adds a step of ``batch_size`` images with the weighted loss ``value``."""
        self.stats.samples += batch_size
        self.stats.steps += 1
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.item()
        self.sums["loss"] = self.sums.get("loss", 0.0) + value
        self.stats.step_losses.append(value)

    def progress_line(self, epoch: int, step: int, value: float, losses: Dict[str, torch.Tensor]) -> str:
        elapsed = time.perf_counter() - self.start
        eta = elapsed / (step + 1) * (self.total_steps - step - 1)
        return (
            f"epoch {epoch} step {step + 1}/{self.total_steps} loss {value:.4f} "
            f"(ce {losses['loss_ce'].item():.3f} bbox {losses['loss_bbox'].item():.3f} "
            f"giou {losses['loss_giou'].item():.3f}) "
            f"{self.stats.samples / elapsed:.1f} img/s eta {eta:.0f}s"
        )

    def pause(self, pause: Callable[[int, EpochStats], bool], step: int) -> bool:
        """``pause(step, stats)`` with the wall time so far; its own time is left out of the epoch's."""
        self.stats.wall_time = self.wall_time()
        t0 = time.perf_counter()
        stop = pause(step, self.stats)
        self.excluded += time.perf_counter() - t0
        return stop


def _timed_step(step_fn: Callable[..., Tuple[torch.Tensor, Dict[str, torch.Tensor]]], samples: Any,
                targets: List[Dict[str, torch.Tensor]], epoch: int, step: int, options: StepOptions,
                tally: _Tally) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``step_fn(samples, targets, ...)`` (a :func:`train_step`) between device synchronisations: its
    time less the checks' goes to the epoch's ``core_time``, the checks' is excluded from its wall time."""
    checks = options.checks
    mark = options.progress or (lambda step, phase: None)
    checked, checks_in_step = 0.0, []
    if checks is not None:
        checked += _timed(checks.before, step, samples, targets)
    options.synchronize()
    t0 = time.perf_counter()
    try:
        loss, losses = step_fn(
            samples, targets, check=lambda loss, losses: check_finite(loss, losses, step, epoch),
            mark=lambda phase: mark(step, phase),
            after_backward=None if checks is None else lambda: checks_in_step.append(
                _timed(checks.after_backward, step)))
    except NonFiniteError as exc:  # raised by the matcher for non-finite predictions
        raise NonFiniteLossError(f"epoch {epoch} step {step}: {exc}") from exc
    options.synchronize()
    tally.stats.core_time += time.perf_counter() - t0 - sum(checks_in_step)
    checked += sum(checks_in_step)
    if checks is not None:
        checked += _timed(checks.after_step, step)
    tally.excluded += checked
    return loss, losses


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    max_norm: float = REFERENCE.clip_max_norm,
    *,
    log_every: int = 10,
    log: Callable[[str], None] = print,
    options: Optional[StepOptions] = None,
) -> EpochStats:
    """Trains over ``data_loader`` (batches of (NestedTensor [B, 3, H, W], targets)) with gradients
    clipped to ``max_norm``, at most ``options.max_steps`` steps (see :class:`StepOptions`); logs a
    progress line every ``log_every`` steps (0: none) and at the last.
    """
    options = options or StepOptions()
    dtype = options.autocast_dtype
    step_fn = functools.partial(
        train_step, model, criterion, optimizer=optimizer, max_norm=max_norm, scaler=options.scaler,
        autocast=lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None))
    model.train()
    criterion.train()
    tally = _Tally(len(data_loader) if options.max_steps is None else min(options.max_steps, len(data_loader)))
    for step, (samples, targets) in enumerate(data_loader):
        if step >= tally.total_steps:
            break
        samples, targets = to_device(samples, targets, device)
        loss, losses = _timed_step(step_fn, samples, targets, epoch, step, options, tally)
        value = loss.item()
        if options.after_step is not None:
            options.after_step()
        tally.count(value, losses, len(targets))
        if log_every and (step % log_every == 0 or step + 1 == tally.total_steps):
            log(tally.progress_line(epoch, step, value, losses))
        if options.pause is not None and tally.pause(options.pause, step):
            break
    tally.stats.wall_time = tally.wall_time()
    tally.stats.losses = {k: v / max(tally.stats.steps, 1) for k, v in tally.sums.items()}
    return tally.stats


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
