"""COCO-format data: the dataset, its transforms, and a synthetic set generator."""
from .coco import (
    CocoDetection,
    DatasetError,
    DegenerateBoxWarning,
    build_dataset,
    coco_api,
    num_classes,
    validate_split,
)
from .synthetic import default_root, ensure_synthetic, generate
from .transforms import make_coco_transforms

__all__ = [
    "CocoDetection",
    "DatasetError",
    "DegenerateBoxWarning",
    "build_dataset",
    "coco_api",
    "num_classes",
    "validate_split",
    "default_root",
    "ensure_synthetic",
    "generate",
    "make_coco_transforms",
]
