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


REFERENCE = Recipe()
