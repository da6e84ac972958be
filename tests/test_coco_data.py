"""CocoDetection on a small synthetic set: targets, dropped boxes, batching, and bad-data errors."""
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from detr.data import CocoDetection, DatasetError, DegenerateBoxWarning, build_dataset, num_classes
from detr.data.synthetic import generate
from detr.data.transforms import make_coco_transforms
from detr.misc import collate_fn

SMALL = dict(scales=[96, 128], max_size=200, crop_sizes=(64, 100), resize_before_crop=(100, 120), val_size=128)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("coco"), seed=3, num_train=12, num_val=4, crowd_every=4)


@pytest.fixture
def fresh(tmp_path) -> Path:
    """A tiny set of its own, for tests that damage it."""
    return generate(tmp_path / "set", seed=1, num_train=3, num_val=1)


def train_files(root: Path):
    return root / "train2017", root / "annotations" / "instances_train2017.json"


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_targets_have_the_reference_fields(root):
    ds = CocoDetection(*train_files(root))
    assert len(ds) == 12
    for image, t in ds:
        assert image.mode == "RGB"
        n = len(t["boxes"])
        assert t["boxes"].shape == (n, 4) and t["boxes"].dtype == torch.float32
        assert t["labels"].shape == (n,) and t["labels"].dtype == torch.int64
        assert t["area"].shape == (n,) and t["iscrowd"].shape == (n,)
        assert t["image_id"].shape == (1,) and t["image_id"].dtype == torch.int64
        assert t["orig_size"].tolist() == t["size"].tolist() == [image.height, image.width]
        assert t["orig_size"].dtype == torch.int64
        assert (t["boxes"][:, 2:] > t["boxes"][:, :2]).all()


def test_boxes_are_xyxy_and_crowds_are_dropped(root):
    ds = CocoDetection(*train_files(root))
    anns = load_json(train_files(root)[1])["annotations"]
    assert any(a["iscrowd"] for a in anns), "the fixture should contain crowd regions"
    for idx in range(len(ds)):
        _, t = ds[idx]
        mine = [a for a in anns if a["image_id"] == int(t["image_id"]) and not a["iscrowd"]]
        expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in mine)]).reshape(-1, 4)
        torch.testing.assert_close(t["boxes"], expected)
        assert t["labels"].tolist() == [a["category_id"] for a in mine]
        assert t["iscrowd"].sum() == 0


def test_degenerate_boxes_are_dropped_with_one_warning(fresh, tmp_path):
    img_folder, ann_file = train_files(fresh)
    data = load_json(ann_file)
    first, second = data["images"][0], data["images"][1]
    bad = [
        (first["id"], [5.0, 5.0, 0.0, 10.0]),
        (first["id"], [5.0, 5.0, 10.0, -2.0]),
        (second["id"], [float(second["width"]) + 3, 4.0, 10.0, 10.0]),  # empty once clamped to the image
    ]
    next_id = max(a["id"] for a in data["annotations"]) + 1
    for k, (image_id, bbox) in enumerate(bad):
        data["annotations"].append(
            {"id": next_id + k, "image_id": image_id, "category_id": 1, "bbox": bbox, "area": 1.0, "iscrowd": 0}
        )
    patched = tmp_path / "instances_patched.json"
    patched.write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(img_folder, patched)
        items = [ds[i] for i in range(len(ds))]
    degenerate = [w for w in caught if issubclass(w.category, DegenerateBoxWarning)]
    assert len(degenerate) == 1
    message = str(degenerate[0].message)
    assert "instances_patched.json" in message and "dropped 3 degenerate boxes" in message and "in 2 images" in message
    assert ds.dropped_boxes == 3
    kept = sum(1 for a in data["annotations"] if not a["iscrowd"]) - 3
    assert sum(len(t["boxes"]) for _, t in items) == kept


def test_clean_set_does_not_warn(root):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateBoxWarning)
        CocoDetection(*train_files(root))


def test_collate_pads_with_a_mask(root):
    ds = CocoDetection(*train_files(root), transforms=make_coco_transforms("val", **SMALL))
    batch = [ds[i] for i in range(3)]
    samples, targets = collate_fn(batch)
    assert len(targets) == 3
    tensors, mask = samples.decompose()
    heights = [img.shape[1] for img, _ in batch]
    widths = [img.shape[2] for img, _ in batch]
    assert tensors.shape == (3, 3, max(heights), max(widths))
    assert mask.shape == (3, max(heights), max(widths)) and mask.dtype == torch.bool
    for i, (h, w) in enumerate(zip(heights, widths)):
        assert not mask[i, :h, :w].any()
        assert mask[i].sum() == mask.shape[1] * mask.shape[2] - h * w
        torch.testing.assert_close(tensors[i, :, :h, :w], batch[i][0])
    for _, t in batch:
        assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()


def test_build_dataset_uses_the_coco_layout(root):
    train = build_dataset("train", root, **SMALL)
    val = build_dataset("val", root, transforms=None)
    assert (len(train), len(val)) == (12, 4)
    assert num_classes(train.coco) == num_classes(val) == 7
    image, target = val[0]
    assert target["boxes"].max() > 1, "transforms=None keeps absolute boxes"
    torch.manual_seed(0)
    image, target = train[0]
    assert image.ndim == 3
    with pytest.raises(ValueError, match="'train' or 'val'"):
        build_dataset("test", root)


# Bad data: every error is a DatasetError naming the file at fault.


def test_missing_annotation_file(fresh):
    with pytest.raises(DatasetError, match="instances_nope.json"):
        CocoDetection(fresh / "train2017", fresh / "annotations" / "instances_nope.json")


def test_missing_image_folder(fresh):
    with pytest.raises(DatasetError, match="train2018"):
        CocoDetection(fresh / "train2018", train_files(fresh)[1])
    shutil.rmtree(fresh / "val2017")
    with pytest.raises(DatasetError, match="val2017"):
        build_dataset("val", fresh)


def test_corrupt_json(fresh):
    img_folder, ann_file = train_files(fresh)
    text = ann_file.read_text()
    ann_file.write_text(text[: len(text) // 2])
    with pytest.raises(DatasetError, match=r"instances_train2017\.json.*line 1, column \d+"):
        CocoDetection(img_folder, ann_file)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_json_missing_a_key(fresh, key):
    img_folder, ann_file = train_files(fresh)
    data = load_json(ann_file)
    del data[key]
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=f"instances_train2017.json.*'{key}'"):
        CocoDetection(img_folder, ann_file)


def test_unknown_image_id(fresh):
    img_folder, ann_file = train_files(fresh)
    data = load_json(ann_file)
    data["annotations"][0]["image_id"] = 999
    data["annotations"][1]["image_id"] = 998
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"instances_train2017.json: 2 annotations refer to unknown image ids.*999"):
        CocoDetection(img_folder, ann_file)


def test_unknown_category_id(fresh):
    img_folder, ann_file = train_files(fresh)
    data = load_json(ann_file)
    data["annotations"][0]["category_id"] = 42
    ann_file.write_text(json.dumps(data))
    with pytest.raises(
        DatasetError, match=r"instances_train2017.json: 1 annotations refer to unknown category ids.*42"
    ):
        CocoDetection(img_folder, ann_file)


def test_missing_image(fresh):
    img_folder, ann_file = train_files(fresh)
    ds = CocoDetection(img_folder, ann_file)
    name = ds.coco.imgs[ds.ids[1]]["file_name"]
    (img_folder / name).unlink()
    ds[0]
    with pytest.raises(DatasetError, match=name):
        ds[1]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image(fresh, damage):
    img_folder, ann_file = train_files(fresh)
    ds = CocoDetection(img_folder, ann_file)
    path = img_folder / ds.coco.imgs[ds.ids[0]]["file_name"]
    data = path.read_bytes()
    path.write_bytes(b"not a jpeg at all" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(DatasetError, match=path.name):
        ds[0]
