"""A few real validation images as one batch, for checks that run the model on real data (the
suite's parity parts with ``--coco-path``)."""
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from .coco import DatasetError, build_dataset

PARITY_IMAGES = 2
# Short and longest side of the parity batch: the generated batch's scale, so that a real dataset
# changes what the parts see, not what they cost.
PARITY_SIZE = (256, 320)


@dataclass
class CocoBatch:
    """Real validation images through the reference's validation transforms: ``images`` [3, H, W]
    normalised, ``targets`` with ``labels`` [N] and ``boxes`` [N, 4] (cx, cy, w, h in 0..1)."""

    images: List[torch.Tensor]
    targets: List[Dict[str, torch.Tensor]]
    image_ids: List[int]
    files: List[str]
    root: Path

    def describe(self) -> str:
        shown = ", ".join(f"{f} (id {i})" for f, i in zip(self.files, self.image_ids))
        return f"inputs: validation images {shown} of {self.root}"


def coco_parity_batch(coco_path, num_classes: int, num_images: int = PARITY_IMAGES,
                      size: Tuple[int, int] = PARITY_SIZE) -> CocoBatch:
    """The first ``num_images`` validation images by id that keep a ground-truth box after the
    transforms (resized to a short side of ``size[0]``, the long side at most ``size[1]``).
    DatasetError names the file at fault: annotations that do not load, an image that does not
    decode, categories the model cannot predict, too few images with boxes."""
    dataset = build_dataset("val", coco_path, val_size=size[0], max_size=size[1])
    too_large = sorted(c for c in dataset.coco.cats if not 0 <= c < num_classes)
    if too_large:
        raise DatasetError(
            f"{dataset.ann_file}: category ids {too_large[:5]} are outside the model's 0..{num_classes - 1}"
        )
    chosen = []
    for index, image_id in enumerate(dataset.ids):
        if len(chosen) == num_images:
            break
        if any(a.get("iscrowd", 0) == 0 for a in dataset.coco.imgToAnns[image_id]):
            image, target = dataset[index]
            if len(target["labels"]):
                chosen.append((image_id, image, {"labels": target["labels"], "boxes": target["boxes"]}))
    if len(chosen) < num_images:
        raise DatasetError(f"{dataset.ann_file}: {len(chosen)} validation image(s) have a ground-truth box; "
                           f"the parity batch needs {num_images}")
    return CocoBatch([c[1] for c in chosen], [c[2] for c in chosen], [c[0] for c in chosen],
                     [dataset.coco.imgs[c[0]]["file_name"] for c in chosen], Path(coco_path))
