"""Detection transforms on (PIL image, target) pairs, as in the reference DETR training recipe.

A target is a dict of tensors: ``boxes`` [N, 4] (absolute xyxy until ``Normalize``, then
normalised cxcywh), ``labels`` [N], ``area`` [N], ``iscrowd`` [N], ``size`` [2] (h, w), plus
fields that pass through untouched (``image_id``, ``orig_size``).

All randomness is drawn from torch's global generator, so ``torch.manual_seed`` makes a
pipeline reproducible.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image
from torch import Tensor

from ..box_ops import box_xyxy_to_cxcywh

Target = Optional[Dict[str, Tensor]]

PER_OBJECT_FIELDS = ("boxes", "labels", "area", "iscrowd")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SCALES = list(range(480, 801, 32))


def _image_hw(image) -> Tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


def _copy(target: Target) -> Target:
    return None if target is None else dict(target)


def hflip(image: Image.Image, target: Target) -> Tuple[Image.Image, Target]:
    """Mirrors the image and its xyxy boxes: x -> w - x, with x0 and x1 swapped."""
    flipped = F.hflip(image)
    target = _copy(target)
    if target is not None and "boxes" in target:
        _, w = _image_hw(image)
        x0, y0, x1, y1 = target["boxes"].unbind(-1)
        target["boxes"] = torch.stack([w - x1, y0, w - x0, y1], dim=-1)
    return flipped, target


def get_size_with_aspect_ratio(image_hw: Tuple[int, int], size: int, max_size: Optional[int] = None) -> Tuple[int, int]:
    """Output (h, w) giving the short side ``size`` while keeping the aspect ratio.

    When the long side would exceed ``max_size`` the short side shrinks to
    ``int(round(max_size * short / long))``; the long side is then truncated, not rounded.
    """
    h, w = image_hw
    if max_size is not None:
        short, long = float(min(h, w)), float(max(h, w))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize(image: Image.Image, target: Target, size: int, max_size: Optional[int] = None) -> Tuple[Image.Image, Target]:
    """Resizes the short side to ``size`` (long side capped at ``max_size``); scales boxes and area."""
    old_h, old_w = _image_hw(image)
    new_h, new_w = get_size_with_aspect_ratio((old_h, old_w), size, max_size)
    resized = F.resize(image, [new_h, new_w])
    target = _copy(target)
    if target is None:
        return resized, None
    ratio_w, ratio_h = new_w / old_w, new_h / old_h
    if "boxes" in target:
        scale = torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=target["boxes"].dtype)
        target["boxes"] = target["boxes"] * scale
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    target["size"] = torch.tensor([new_h, new_w], dtype=torch.int64)
    return resized, target


def crop(image: Image.Image, target: Target, region: Tuple[int, int, int, int]) -> Tuple[Image.Image, Target]:
    """Crops ``region`` = (top, left, height, width); boxes are shifted and clamped to the crop,
    and objects left with zero width or height are dropped from every per-object field."""
    top, left, height, width = region
    cropped = F.crop(image, top, left, height, width)
    target = _copy(target)
    if target is None:
        return cropped, None
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    if "boxes" in target:
        boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
        boxes = boxes.reshape(-1, 2, 2)
        boxes = torch.min(boxes, torch.tensor([width, height], dtype=boxes.dtype)).clamp(min=0)
        keep = (boxes[:, 1, :] > boxes[:, 0, :]).all(dim=1)
        target["boxes"] = boxes.reshape(-1, 4)
        target["area"] = (boxes[:, 1, :] - boxes[:, 0, :]).prod(dim=1)
        for field in PER_OBJECT_FIELDS:
            if field in target:
                target[field] = target[field][keep]
    return cropped, target


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high], both inclusive, from torch's generator."""
    return int(torch.randint(low, high + 1, (1,)).item())


def _choice(values: Sequence):
    return values[_randint(0, len(values) - 1)]


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, target: Target = None):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t}" for t in self.transforms)
        return f"{type(self).__name__}({inner}\n)"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target: Target = None):
        if torch.rand(()).item() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class RandomResize:
    """Short side to a random choice of ``sizes``, long side at most ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None):
        if not sizes:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image, target: Target = None):
        return resize(image, target, _choice(self.sizes), self.max_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sizes={self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crop of random height and width in [min_size, max_size], each limited by the image."""

    def __init__(self, min_size: int, max_size: int):
        if min_size > max_size:
            raise ValueError(f"RandomSizeCrop: min_size {min_size} > max_size {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image, target: Target = None):
        img_h, img_w = _image_hw(image)
        # Limited by the image so that images smaller than min_size are still valid input.
        hi_w, hi_h = min(img_w, self.max_size), min(img_h, self.max_size)
        w = _randint(min(self.min_size, hi_w), hi_w)
        h = _randint(min(self.min_size, hi_h), hi_h)
        region = T.RandomCrop.get_params(image, [h, w])
        return crop(image, target, region)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_size={self.min_size}, max_size={self.max_size})"


class RandomSelect:
    """Applies ``transforms1`` with probability ``p``, otherwise ``transforms2``."""

    def __init__(self, transforms1: Callable, transforms2: Callable, p: float = 0.5):
        self.transforms1 = transforms1
        self.transforms2 = transforms2
        self.p = p

    def __call__(self, image, target: Target = None):
        if torch.rand(()).item() < self.p:
            return self.transforms1(image, target)
        return self.transforms2(image, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms1}, {self.transforms2}, p={self.p})"


class ToTensor:
    """PIL image -> float tensor [3, H, W] in [0, 1]."""

    def __call__(self, image, target: Target = None):
        return F.to_tensor(image), target

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Normalize:
    """Normalises the image [3, H, W] and turns boxes into cxcywh relative to the image size."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, image: Tensor, target: Target = None):
        image = F.normalize(image, mean=self.mean, std=self.std)
        target = _copy(target)
        if target is not None and "boxes" in target:
            h, w = image.shape[-2:]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            target["boxes"] = box_xyxy_to_cxcywh(target["boxes"].to(torch.float32)) / scale
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


IMAGE_SETS = ("train", "val")


def make_coco_transforms(
    image_set: str,
    scales: Optional[List[int]] = None,
    max_size: int = 1333,
    crop_sizes: Tuple[int, int] = (384, 600),
    resize_before_crop: Sequence[int] = (400, 500, 600),
    val_size: int = 800,
    crop: bool = True,
) -> Compose:
    """The reference augmentation (``train``) or evaluation resize (``val``).

    The defaults are the COCO recipe; small synthetic images pass smaller ``scales``,
    ``crop_sizes``, ``resize_before_crop`` and ``val_size``, or ``crop=False`` to keep every object.
    """
    normalize = Compose([ToTensor(), Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    if scales is None:
        scales = DEFAULT_SCALES
    if image_set == "train" and not crop:
        return Compose([RandomHorizontalFlip(), RandomResize(scales, max_size=max_size), normalize])
    if image_set == "train":
        return Compose([
            RandomHorizontalFlip(),
            RandomSelect(
                RandomResize(scales, max_size=max_size),
                Compose([
                    RandomResize(list(resize_before_crop)),
                    RandomSizeCrop(*crop_sizes),
                    RandomResize(scales, max_size=max_size),
                ]),
            ),
            normalize,
        ])
    if image_set == "val":
        return Compose([RandomResize([val_size], max_size=max_size), normalize])
    raise ValueError(f"unknown image_set {image_set!r}; expected one of {IMAGE_SETS}")
