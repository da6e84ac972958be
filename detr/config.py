"""Named model configurations: ``r50`` (the reference DETR) and ``tiny`` (the same code, CPU-sized)."""
import dataclasses
from dataclasses import dataclass
from typing import Optional

from .recipe import REFERENCE


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet50"
    dilation: bool = False
    backbone_weights: Optional[str] = None
    backbone_norm: str = "frozen"
    backbone_stride: int = 32
    lr_backbone: float = REFERENCE.lr_backbone  # > 0 trains the backbone's last layers
    position_embedding: str = "sine"
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False
    num_queries: int = 100
    num_classes: int = 91
    aux_loss: bool = True
    set_cost_class: float = 1.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    eos_coef: float = 0.1


CONFIGS = {
    "r50": ModelConfig(),
    "tiny": ModelConfig(
        backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=256, num_queries=20
    ),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """The configuration ``name`` with ``overrides`` applied; unknown names and fields raise ValueError."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}: expected one of {', '.join(CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown model overrides {sorted(unknown)}: accepted are {', '.join(sorted(fields))}")
    return dataclasses.replace(CONFIGS[name], **overrides)
