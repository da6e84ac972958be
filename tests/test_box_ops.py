import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from detr import box_ops


def random_xyxy(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g)
    wh = torch.rand(n, 2, generator=g) * 0.5
    return torch.cat([xy, xy + wh], dim=1)


@given(st.integers(1, 20), st.integers(0, 1000))
def test_conversion_round_trip(n, seed):
    boxes = random_xyxy(n, seed)
    back = box_ops.box_cxcywh_to_xyxy(box_ops.box_xyxy_to_cxcywh(boxes))
    torch.testing.assert_close(back, boxes)


def test_cxcywh_to_xyxy_values():
    out = box_ops.box_cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.2, 0.4]]))
    torch.testing.assert_close(out, torch.tensor([[0.4, 0.3, 0.6, 0.7]]))


def naive_giou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def test_generalized_box_iou_against_naive_formula():
    a, b = random_xyxy(5, 1).double(), random_xyxy(4, 2).double()
    giou = box_ops.generalized_box_iou(a, b)
    expected = torch.tensor([[naive_giou(x.tolist(), y.tolist()) for y in b] for x in a], dtype=torch.float64)
    torch.testing.assert_close(giou, expected)
    assert giou.min() >= -1 and giou.max() <= 1


@given(st.integers(1, 30), st.integers(0, 1000))
def test_aligned_giou_is_the_diagonal_of_pairwise(n, seed):
    a, b = random_xyxy(n, seed), random_xyxy(n, seed + 1)
    torch.testing.assert_close(box_ops.aligned_generalized_box_iou(a, b), torch.diag(box_ops.generalized_box_iou(a, b)))


def test_giou_of_identical_boxes_is_one():
    a = random_xyxy(6)
    torch.testing.assert_close(box_ops.aligned_generalized_box_iou(a, a), torch.ones(6))


def test_degenerate_boxes_raise_value_error_naming_rows():
    boxes = random_xyxy(4)
    boxes[2] = torch.tensor([0.5, 0.5, 0.4, 0.6])
    with pytest.raises(ValueError, match=r"degenerate.*rows 2: \[0.5"):
        box_ops.generalized_box_iou(boxes, random_xyxy(3))


def test_non_finite_boxes_raise_value_error():
    boxes = random_xyxy(3)
    boxes[1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*rows 1"):
        box_ops.aligned_generalized_box_iou(random_xyxy(3), boxes)
