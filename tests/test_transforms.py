"""The detection transforms: box bookkeeping under flip, resize, crop and normalisation."""
import numpy as np
import pytest
import torch
from PIL import Image

from detr.data import transforms as T


def make_sample(w: int = 200, h: int = 150, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    boxes = torch.tensor([[10.0, 20.0, 60.0, 80.0], [100.0, 5.0, 190.0, 140.0], [0.0, 0.0, 200.0, 150.0]])
    target = {
        "boxes": boxes,
        "labels": torch.tensor([1, 2, 3]),
        "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        "iscrowd": torch.zeros(3, dtype=torch.int64),
        "image_id": torch.tensor([7]),
        "orig_size": torch.tensor([h, w]),
        "size": torch.tensor([h, w]),
    }
    return image, target


def test_hflip_mirrors_boxes_and_twice_is_identity():
    image, target = make_sample()
    flipped, t1 = T.hflip(image, target)
    torch.testing.assert_close(t1["boxes"][0], torch.tensor([140.0, 20.0, 190.0, 80.0]))
    assert np.array_equal(np.asarray(flipped)[:, ::-1], np.asarray(image))
    back, t2 = T.hflip(flipped, t1)
    torch.testing.assert_close(t2["boxes"], target["boxes"])
    assert np.array_equal(np.asarray(back), np.asarray(image))
    assert target["boxes"][0, 0] == 10.0, "the input target must not be modified"


def test_random_horizontal_flip_probability_extremes():
    image, target = make_sample()
    _, kept = T.RandomHorizontalFlip(p=0.0)(image, target)
    _, flipped = T.RandomHorizontalFlip(p=1.0)(image, target)
    torch.testing.assert_close(kept["boxes"], target["boxes"])
    torch.testing.assert_close(flipped["boxes"], T.hflip(image, target)[1]["boxes"])


@pytest.mark.parametrize(
    "hw, size, max_size, expected",
    [
        ((480, 640), 800, 1333, (800, 1066)),
        ((640, 480), 800, 1333, (1066, 800)),
        ((800, 1000), 800, 1333, (800, 1000)),
        ((100, 400), 800, 1333, (333, 1332)),
        ((150, 200), 64, None, (64, 85)),
        # The reference rounds the short side, so the truncated long side can pass max_size by a little.
        ((100, 300), 800, 1001, (334, 1002)),
    ],
)
def test_size_with_aspect_ratio_rounds_like_the_reference(hw, size, max_size, expected):
    assert T.get_size_with_aspect_ratio(hw, size, max_size) == expected


def test_resize_scales_boxes_area_and_size():
    image, target = make_sample(w=200, h=100)
    out, t = T.resize(image, target, 50)
    assert out.size == (100, 50)
    torch.testing.assert_close(t["boxes"], target["boxes"] * 0.5)
    torch.testing.assert_close(t["area"], target["area"] * 0.25)
    assert t["size"].tolist() == [50, 100]
    assert t["orig_size"].tolist() == [100, 200]


def test_random_resize_respects_max_size():
    image, target = make_sample(w=400, h=100)
    target["boxes"] = torch.tensor([[0.0, 0.0, 400.0, 100.0]])
    out, t = T.RandomResize([200], max_size=300)(image, target)
    assert out.size == (300, 75)
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.0, 0.0, 300.0, 75.0]]))
    assert t["size"].tolist() == [75, 300]


def test_crop_clamps_boxes_and_drops_empty_ones():
    image, _ = make_sample(w=200, h=150)
    target = {
        "boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0], [90.0, 90.0, 120.0, 120.0], [0.0, 0.0, 5.0, 5.0]]),
        "labels": torch.tensor([1, 2, 3]),
        "area": torch.tensor([1600.0, 900.0, 25.0]),
        "iscrowd": torch.tensor([0, 0, 0]),
        "image_id": torch.tensor([3]),
    }
    out, t = T.crop(image, target, (20, 20, 60, 60))
    assert out.size == (60, 60)
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.0, 0.0, 30.0, 30.0]]))
    assert t["labels"].tolist() == [1]
    torch.testing.assert_close(t["area"], torch.tensor([900.0]))
    assert t["iscrowd"].tolist() == [0]
    assert t["size"].tolist() == [60, 60]
    assert t["image_id"].tolist() == [3]


@pytest.mark.parametrize("image_wh", [(200, 150), (40, 30)])
def test_random_size_crop_keeps_boxes_inside(image_wh):
    image, target = make_sample(*image_wh)
    crop = T.RandomSizeCrop(50, 120)
    for seed in range(40):
        torch.manual_seed(seed)
        out, t = crop(image, target)
        h, w = t["size"].tolist()
        assert (out.height, out.width) == (h, w)
        assert min(image.height, 50) <= h <= min(image.height, 120)
        assert min(image.width, 50) <= w <= min(image.width, 120)
        boxes = t["boxes"]
        n = len(boxes)
        assert len(t["labels"]) == len(t["area"]) == len(t["iscrowd"]) == n
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes >= 0).all() and (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all()
        torch.testing.assert_close(t["area"], (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))


def test_normalize_gives_relative_cxcywh():
    image = torch.ones(3, 100, 200) * torch.tensor([0.5, 0.25, 0.75])[:, None, None]
    target = {"boxes": torch.tensor([[0.0, 0.0, 200.0, 100.0], [50.0, 10.0, 150.0, 30.0]])}
    out, t = T.Normalize([0.5, 0.25, 0.75], [0.1, 0.2, 0.3])(image, target)
    torch.testing.assert_close(out, torch.zeros_like(out))
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.5, 0.2, 0.5, 0.2]]))


SMALL = dict(scales=[96, 112, 128], max_size=200, crop_sizes=(64, 100), resize_before_crop=(100, 120), val_size=128)


def test_train_pipeline_yields_valid_normalised_boxes():
    image, target = make_sample()
    tf = T.make_coco_transforms("train", **SMALL)
    for seed in range(20):
        torch.manual_seed(seed)
        out, t = tf(image, target)
        assert out.dtype == torch.float32 and out.shape[0] == 3
        assert t["size"].tolist() == list(out.shape[-2:])
        assert max(out.shape[-2:]) <= 200
        b = t["boxes"]
        assert ((b >= 0) & (b <= 1)).all()
        assert (b[:, 2:] > 0).all()


def test_transforms_are_deterministic_under_manual_seed():
    image, target = make_sample()
    tf = T.make_coco_transforms("train", **SMALL)
    runs = []
    for seed in (0, 0, 1, 2, 3, 4):
        torch.manual_seed(seed)
        runs.append(tf(image, target))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1]["boxes"], runs[1][1]["boxes"])
    shapes = {tuple(img.shape) for img, _ in runs}
    assert len(shapes) > 1, "different seeds should give different augmentations"


def test_val_pipeline_resizes_short_side():
    image, target = make_sample(w=200, h=150)
    out, t = T.make_coco_transforms("val", **SMALL)(image, target)
    assert tuple(out.shape) == (3, 128, 170)
    assert t["orig_size"].tolist() == [150, 200]


def test_unknown_image_set_names_accepted_values():
    with pytest.raises(ValueError, match="'train'.*'val'"):
        T.make_coco_transforms("test")
