"""COCO-format detection dataset (boxes only) with errors that name the offending file."""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset, Subset

from .transforms import make_coco_transforms

PathLike = Union[str, Path]
REQUIRED_KEYS = ("images", "annotations", "categories")
_DEFAULT = object()


class DatasetError(ValueError):
    """Bad or missing data: the message names the file at fault."""


class DegenerateBoxWarning(UserWarning):
    """Annotations whose boxes are empty (w <= 0 or h <= 0) and are dropped."""


def _examples(items: List[Any], limit: int = 3) -> str:
    shown = ", ".join(str(x) for x in items[:limit])
    return shown + (", ..." if len(items) > limit else "")


def load_coco_json(ann_file: PathLike) -> COCO:
    """Reads and checks a COCO annotation file, then indexes it with pycocotools (quietly)."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DatasetError(f"annotation file {ann_file} does not exist")
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"annotation file {ann_file} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno} (char {e.pos})"
        ) from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"annotation file {ann_file} is not valid JSON text: {e}") from e
    except OSError as e:
        raise DatasetError(f"cannot read annotation file {ann_file}: {e}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"annotation file {ann_file}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise DatasetError(
            f"annotation file {ann_file} lacks the key(s) {missing}; a COCO file needs {list(REQUIRED_KEYS)}"
        )
    for key in REQUIRED_KEYS:
        if not isinstance(data[key], list):
            raise DatasetError(f"annotation file {ann_file}: {key!r} must be a list, got {type(data[key]).__name__}")
    _check_fields(ann_file, data)
    _check_references(ann_file, data)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _check_fields(ann_file: Path, data: Dict[str, Any]) -> None:
    needed = {
        "images": ("id", "file_name"),
        "annotations": ("id", "image_id", "category_id", "bbox"),
        "categories": ("id",),
    }
    for key, fields in needed.items():
        bad = [
            i for i, entry in enumerate(data[key]) if not isinstance(entry, dict) or any(f not in entry for f in fields)
        ]
        if bad:
            raise DatasetError(
                f"annotation file {ann_file}: {len(bad)} entries of {key!r} lack one of {list(fields)} "
                f"(indices {_examples(bad)})"
            )
    bad = [a["id"] for a in data["annotations"] if not _is_xywh(a["bbox"])]
    if bad:
        raise DatasetError(
            f"annotation file {ann_file}: {len(bad)} annotations have a bbox that is not [x, y, w, h] "
            f"(ids {_examples(bad)})"
        )


def _is_xywh(bbox: Any) -> bool:
    return (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    )


def _check_references(ann_file: Path, data: Dict[str, Any]) -> None:
    image_ids = {img["id"] for img in data["images"]}
    category_ids = {cat["id"] for cat in data["categories"]}
    for what, field, known in (("image", "image_id", image_ids), ("category", "category_id", category_ids)):
        unknown = [(a["id"], a[field]) for a in data["annotations"] if a[field] not in known]
        if unknown:
            shown = _examples([f"annotation {aid} -> {what} {ref}" for aid, ref in unknown])
            raise DatasetError(
                f"annotation file {ann_file}: {len(unknown)} annotations refer to unknown {what} ids ({shown})"
            )


def count_degenerate(data: Dict[str, Any]) -> Tuple[int, int]:
    """(boxes, images) of non-crowd annotations that would be dropped: w <= 0 or h <= 0 in the
    annotation, or after clamping to the image's declared width and height."""
    sizes = {img["id"]: (img.get("width"), img.get("height")) for img in data["images"]}
    dropped, images = 0, set()
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0) != 0:
            continue
        x, y, w, h = ann["bbox"]
        img_w, img_h = sizes.get(ann["image_id"], (None, None))
        x0, y0, x1, y1 = x, y, x + w, y + h
        if img_w is not None and img_h is not None:
            x0, x1 = min(max(x0, 0), img_w), min(max(x1, 0), img_w)
            y0, y1 = min(max(y0, 0), img_h), min(max(y1, 0), img_h)
        if w <= 0 or h <= 0 or x1 <= x0 or y1 <= y0:
            dropped += 1
            images.add(ann["image_id"])
    return dropped, len(images)


def prepare_target(anns: List[Dict[str, Any]], image_id: int, w: int, h: int) -> Dict[str, torch.Tensor]:
    """COCO annotations of one image -> target dict.

    Crowd objects are dropped; boxes go from xywh to xyxy, are clamped to the image and
    dropped when empty. ``boxes`` [N, 4] float32, ``labels`` [N] int64, ``area`` [N] float32,
    ``iscrowd`` [N] int64, ``image_id`` [1], ``orig_size`` and ``size`` [2] = (h, w), all int64.
    """
    anns = [a for a in anns if a.get("iscrowd", 0) == 0]
    boxes = torch.as_tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=w)
    boxes[:, 1::2].clamp_(min=0, max=h)
    labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
    area = torch.tensor([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], dtype=torch.float32)
    iscrowd = torch.zeros(len(anns), dtype=torch.int64)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    size = torch.tensor([h, w], dtype=torch.int64)
    return {
        "boxes": boxes[keep],
        "labels": labels[keep],
        "image_id": torch.tensor([image_id], dtype=torch.int64),
        "area": area[keep],
        "iscrowd": iscrowd[keep],
        "orig_size": size,
        "size": size.clone(),
    }


class CocoDetection(Dataset):
    """Images of ``img_folder`` with the boxes of ``ann_file``; item = (image, target).

    Without ``transforms`` the image is an RGB PIL image and boxes are absolute xyxy.
    """

    def __init__(self, img_folder: PathLike, ann_file: PathLike, transforms: Optional[Callable] = None):
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        if not self.img_folder.is_dir():
            raise DatasetError(f"image folder {self.img_folder} does not exist (annotations {self.ann_file.name})")
        self.coco = load_coco_json(self.ann_file)
        self.ids = sorted(self.coco.imgs.keys())
        self.transforms = transforms
        self.dropped_boxes, images = count_degenerate(self.coco.dataset)
        if self.dropped_boxes:
            warnings.warn(
                f"{self.ann_file.name}: dropped {self.dropped_boxes} degenerate boxes (w <= 0 or h <= 0) "
                f"in {images} images",
                DegenerateBoxWarning,
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.ids)

    def _read(self, image_id: int, read: Callable[[Image.Image], Any]) -> Any:
        """``read(image)`` of the opened image; DatasetError names an image that is missing or unreadable."""
        path = self.img_folder / self.coco.imgs[image_id]["file_name"]
        if not path.is_file():
            raise DatasetError(f"image {path} (id {image_id}, listed in {self.ann_file.name}) does not exist")
        try:
            with Image.open(path) as img:
                return read(img)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DatasetError(f"cannot read image {path} (id {image_id}, listed in {self.ann_file.name}): {e}") from e

    def load_image(self, image_id: int) -> Image.Image:
        return self._read(image_id, lambda img: img.convert("RGB"))

    def check_image(self, image_id: int, decode: bool = False) -> None:
        """Opens the image (its header; all of it with ``decode``): DatasetError names it if it cannot be read."""
        if decode:
            self.load_image(image_id)
            return
        width, height = self._read(image_id, lambda img: img.size)  # opening parses the header only
        if width <= 0 or height <= 0:
            path = self.img_folder / self.coco.imgs[image_id]["file_name"]
            raise DatasetError(f"image {path} (id {image_id}, listed in {self.ann_file.name}) is {width}x{height}")

    def __getitem__(self, idx: int):
        image_id = self.ids[idx]
        image = self.load_image(image_id)
        target = prepare_target(self.coco.imgToAnns[image_id], image_id, image.width, image.height)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {self.img_folder}, {self.ann_file})"


def build_dataset(image_set: str, coco_path: PathLike, transforms: Any = _DEFAULT, **transform_kwargs) -> CocoDetection:
    """``<coco_path>/{train,val}2017/`` with ``<coco_path>/annotations/instances_{train,val}2017.json``.

    ``transforms`` defaults to ``make_coco_transforms(image_set, **transform_kwargs)``; pass
    None for raw PIL images and absolute boxes.
    """
    if image_set not in ("train", "val"):
        raise ValueError(f"unknown image_set {image_set!r}; expected 'train' or 'val'")
    root = Path(coco_path)
    if not root.is_dir():
        raise DatasetError(f"COCO root {root} does not exist")
    if transforms is _DEFAULT:
        transforms = make_coco_transforms(image_set, **transform_kwargs)
    elif transform_kwargs:
        raise TypeError(f"transform options {sorted(transform_kwargs)} given together with explicit transforms")
    return CocoDetection(
        root / f"{image_set}2017",
        root / "annotations" / f"instances_{image_set}2017.json",
        transforms=transforms,
    )


def _base_indices(dataset: Union[CocoDetection, Subset], indices: Iterable[int]) -> Tuple[CocoDetection, List[int]]:
    indices = list(indices)
    while isinstance(dataset, Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def validate_split(dataset: Union[CocoDetection, Subset], indices: Optional[Iterable[int]] = None,
                   decode: bool = False) -> None:
    """Checks a split before any training: it has ground truth (a non-crowd box on one of its
    images), and the images at ``indices`` (default all) can be opened (decoded, with ``decode``).
    DatasetError names the annotation file or the image. Annotations that refer to unknown images
    or categories were already refused when the file was loaded."""
    base, every = _base_indices(dataset, range(len(dataset)))
    boxes = sum(1 for i in every for a in base.coco.imgToAnns[base.ids[i]] if a.get("iscrowd", 0) == 0)
    if boxes == 0:
        raise DatasetError(f"{base.ann_file}: the {len(every)} images used have no ground-truth boxes "
                           "(COCO AP would be -1, and there is nothing to learn)")
    _, chosen = _base_indices(dataset, range(len(dataset)) if indices is None else indices)
    for i in chosen:
        base.check_image(base.ids[i], decode=decode)


def coco_api(dataset: Union[CocoDetection, Subset]) -> COCO:
    """The pycocotools index behind a dataset, looking through ``Subset`` wrappers."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset.coco


def num_classes(coco: Union[COCO, CocoDetection]) -> int:
    """Classification head size without "no object": max category id + 1 (91 for COCO)."""
    if isinstance(coco, (CocoDetection, Subset)):
        coco = coco_api(coco)
    if not coco.cats:
        raise DatasetError("the annotations declare no categories")
    return max(coco.cats) + 1
