"""DETR, faithful to the reference implementation, with its data pipeline, evaluation and engine.

    model, criterion, postprocess = detr.build("r50")

Knows nothing of pytest.
"""
from typing import Tuple

from .backbone import build_backbone
from .config import CONFIGS, ModelConfig, get_config
from .criterion import SetCriterion
from .matcher import build_matcher
from .model import DETR, PostProcess
from .recipe import REFERENCE, Recipe, linear_decay, param_groups, step_decay
from .transformer import build_transformer

__all__ = ["build", "build_from_config", "get_config", "CONFIGS", "ModelConfig", "DETR", "SetCriterion", "PostProcess",
           "Recipe", "REFERENCE", "linear_decay", "param_groups", "step_decay"]


def build(name: str = "r50", **overrides) -> Tuple[DETR, SetCriterion, PostProcess]:
    """(model, criterion, postprocess) of a named configuration, randomly initialised on the CPU."""
    return build_from_config(get_config(name, **overrides))


def build_from_config(cfg: ModelConfig) -> Tuple[DETR, SetCriterion, PostProcess]:
    model = DETR(build_backbone(cfg), build_transformer(cfg), cfg.num_classes, cfg.num_queries, cfg.aux_loss)
    weight_dict = {"loss_ce": 1.0, "loss_bbox": cfg.bbox_loss_coef, "loss_giou": cfg.giou_loss_coef}
    if cfg.aux_loss:
        weight_dict.update({f"{k}_{i}": v for i in range(cfg.dec_layers - 1) for k, v in list(weight_dict.items())})
    criterion = SetCriterion(
        cfg.num_classes, build_matcher(cfg), weight_dict, cfg.eos_coef, ["labels", "boxes", "cardinality"]
    )
    return model, criterion, PostProcess()

