"""The reference's optimisation recipe: AdamW at 1e-4 (the backbone at 1e-5), weight decay 1e-4,
gradients clipped to a total norm of 0.1."""
from dataclasses import dataclass

import torch
from torch import nn


def param_groups(model: nn.Module, lr: float, lr_backbone: float):
    """The reference's AdamW groups: the backbone at ``lr_backbone``, everything else at ``lr``."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in trainable if "backbone" not in n], "lr": lr},
        {"params": [p for n, p in trainable if "backbone" in n], "lr": lr_backbone},
    ]


@dataclass(frozen=True)
class Recipe:
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1

    def optimizer(self, model: nn.Module, eps: float = 1e-8) -> torch.optim.AdamW:
        """AdamW over the trainable parameters of ``model`` (unwrapped from DDP), in two groups."""
        return torch.optim.AdamW(param_groups(model, self.lr, self.lr_backbone), lr=self.lr,
                                 weight_decay=self.weight_decay, eps=eps)

    def fix_hp(self) -> str:
        """The recipe as FlagPerf-style ``key=value`` pairs."""
        return (f"lr={self.lr},lr_backbone={self.lr_backbone},weight_decay={self.weight_decay},"
                f"clip_max_norm={self.clip_max_norm}")


def _warm_up(done: int, warmup: int) -> float:
    return min(1.0, (done + 1) / warmup) if warmup > 0 else 1.0


def step_decay(done: int, warmup: int, every: int) -> float:
    """The learning-rate factor of the step after ``done`` steps in the reference's schedule: linear
    up from 0 over ``warmup`` steps, and 10x lower after every ``every`` steps (PyTorch's StepLR,
    counted in steps). The two multiply, so a drop within the warm-up holds after it too."""
    return _warm_up(done, warmup) * (0.1 ** (done // every) if every > 0 else 1.0)


def linear_decay(done: int, warmup: int, start: int, end: int) -> float:
    """The learning-rate factor of the step after ``done`` steps: linear up from 0 over ``warmup``
    steps, 1 until step ``start``, then linear down to reach 0 at step ``end`` (the run's last step
    still has a small rate). Cooling down over the run's second part instead of the reference's
    one 10x drop lets a short run end at a low rate without a long plateau at the high one."""
    down = 1.0 if done < start else max(0.0, (end - done) / max(end - start, 1))
    return _warm_up(done, warmup) * down


REFERENCE = Recipe()
