"""Box conversions and (generalised) IoU on top of torchvision.ops, with clear errors for bad boxes.

Boxes are [N, 4]; ``xyxy`` is (x0, y0, x1, y1), ``cxcywh`` is (centre x, centre y, width, height).
"""
from typing import Tuple

import torch
from torch import Tensor
from torchvision.ops import box_area, box_convert
from torchvision.ops import generalized_box_iou as _pairwise_giou

from .misc import NonFiniteError


def box_cxcywh_to_xyxy(x: Tensor) -> Tensor:
    return box_convert(x, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(x: Tensor) -> Tensor:
    return box_convert(x, "xyxy", "cxcywh")


def check_boxes(boxes: Tensor, name: str) -> None:
    """Raises ValueError naming the rows of ``boxes`` [N, 4] (xyxy) that are non-finite or have x1 < x0 or y1 < y0
    (NonFiniteError, a ValueError, when any is non-finite).

    GIoU is undefined there; the reference only asserts, which hides NaN coming from a device.
    """
    finite = torch.isfinite(boxes).all(-1)
    ordered = (boxes[:, 2:] >= boxes[:, :2]).all(-1)
    bad = ~(finite & ordered)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        shown = ", ".join(f"{int(i)}: {boxes[i].tolist()}" for i in rows[:5])
        kind = "non-finite" if not bool(finite.all()) else "degenerate (x1 < x0 or y1 < y0)"
        error = NonFiniteError if kind == "non-finite" else ValueError
        raise error(
            f"{name}: {len(rows)} of {len(boxes)} boxes are {kind}, GIoU is undefined; rows {shown}"
            + (" ..." if len(rows) > 5 else "")
        )


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise GIoU of xyxy boxes [N, 4] and [M, 4] -> [N, M]."""
    check_boxes(boxes1, "generalized_box_iou boxes1")
    check_boxes(boxes2, "generalized_box_iou boxes2")
    return _pairwise_giou(boxes1, boxes2)


def aligned_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of matching rows of xyxy boxes [N, 4] and [N, 4] -> [N].

    Equals ``diag(generalized_box_iou(boxes1, boxes2))`` with the same arithmetic (no epsilon,
    unlike torchvision's GIoU loss) without building the N x N matrix.
    """
    check_boxes(boxes1, "aligned_generalized_box_iou boxes1")
    check_boxes(boxes2, "aligned_generalized_box_iou boxes2")
    inter, union = _aligned_inter_union(boxes1, boxes2)
    iou = inter / union
    lt = torch.min(boxes1[:, :2], boxes2[:, :2])
    rb = torch.max(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[:, 0] * wh[:, 1]
    return iou - (area - union) / area


def _aligned_inter_union(boxes1: Tensor, boxes2: Tensor) -> Tuple[Tensor, Tensor]:
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter, union
