"""The synthetic COCO-format set: determinism, validity, and the atomic cache."""
import contextlib
import io
import json
import threading
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

from detr.data import synthetic
from detr.data.synthetic import COMPLETE_MARKER, default_root, ensure_synthetic, generate

TINY = dict(num_train=6, num_val=2)


def file_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    a = file_bytes(generate(tmp_path / "a", seed=5, **TINY))
    b = file_bytes(generate(tmp_path / "b", seed=5, **TINY))
    c = file_bytes(generate(tmp_path / "c", seed=6, **TINY))
    assert len(a) == 6 + 2 + 2
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


@pytest.mark.parametrize("split, count", [("train", 30), ("val", 10)])
def test_is_valid_coco(tmp_path, split, count):
    root = generate(tmp_path, seed=0, num_train=30, num_val=10, min_size=128, max_size=320)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(root / "annotations" / f"instances_{split}2017.json"))
    assert len(coco.imgs) == count
    assert sorted(coco.cats) == [1, 2, 3, 4, 5, 6]
    assert len({c["name"] for c in coco.cats.values()}) == 6
    crowds = 0
    for image_id, info in coco.imgs.items():
        with Image.open(root / f"{split}2017" / info["file_name"]) as im:
            assert im.format == "JPEG" and im.size == (info["width"], info["height"])
        assert 128 <= info["width"] <= 320 and 128 <= info["height"] <= 320
        anns = coco.imgToAnns[image_id]
        assert 1 <= sum(1 for a in anns if not a["iscrowd"]) <= 6
        crowds += sum(a["iscrowd"] for a in anns)
        for a in anns:
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0
            assert x + w <= info["width"] and y + h <= info["height"]
            assert a["area"] == w * h
    assert crowds == count // 10
    assert len({a["id"] for a in coco.anns.values()}) == len(coco.anns)


def test_train_and_val_image_ids_are_disjoint(tmp_path):
    root = generate(tmp_path, seed=0, **TINY)
    ids = {
        split: {
            img["id"]
            for img in json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())["images"]
        }
        for split in ("train", "val")
    }
    assert not ids["train"] & ids["val"]


def test_ensure_synthetic_generates_once(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = []
    real = synthetic.generate

    def counting(root, **kw):
        calls.append(Path(root))
        visible = [p for p in cache.iterdir() if not p.name.startswith(".")]
        assert all((p / COMPLETE_MARKER).is_file() for p in visible), "only complete sets may be visible"
        return real(root, **kw)

    monkeypatch.setattr(synthetic, "generate", counting)
    first = ensure_synthetic(cache, seed=0, **TINY)
    marker = first / COMPLETE_MARKER
    assert marker.is_file() and (first / "annotations" / "instances_val2017.json").is_file()
    assert len(calls) == 1 and calls[0] != first and calls[0].parent == cache
    stamp = marker.stat().st_mtime_ns
    again = ensure_synthetic(cache, seed=0, **TINY)
    assert again == first and len(calls) == 1 and marker.stat().st_mtime_ns == stamp
    other = ensure_synthetic(cache, seed=1, **TINY)
    assert other != first and len(calls) == 2
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.name, other.name])


def test_explicit_defaults_share_the_cached_set(tmp_path):
    a = ensure_synthetic(tmp_path, seed=2, num_train=4, num_val=2)
    b = ensure_synthetic(tmp_path, seed=2, num_train=4, num_val=2, max_size=320)
    assert a == b
    with pytest.raises(TypeError, match="num_test"):
        ensure_synthetic(tmp_path, num_test=3)


def test_set_without_marker_is_regenerated(tmp_path):
    root = ensure_synthetic(tmp_path, seed=0, **TINY)
    (root / COMPLETE_MARKER).unlink()
    (root / "stray.txt").write_text("half-written")
    assert ensure_synthetic(tmp_path, seed=0, **TINY) == root
    assert (root / COMPLETE_MARKER).is_file() and not (root / "stray.txt").exists()
    assert len(list(tmp_path.iterdir())) == 1


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    def broken(root, **kw):
        (Path(root) / "annotations").mkdir(parents=True)
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "generate", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_synthetic(tmp_path, seed=0, **TINY)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_callers_share_one_complete_set(tmp_path):
    results, errors = [], []

    def call():
        try:
            results.append(ensure_synthetic(tmp_path, seed=4, **TINY))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    assert (results[0] / COMPLETE_MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DETR_SYNTHETIC_CACHE", str(tmp_path))
    assert default_root() == tmp_path
    monkeypatch.delenv("DETR_SYNTHETIC_CACHE")
    assert default_root() == Path.home() / ".cache" / "detr-conformance"


def test_losing_a_race_returns_the_winners_set(tmp_path, monkeypatch):
    real = synthetic.generate
    raced = []

    def racing(root, **kw):
        real(root, **kw)
        if not raced:
            raced.append(True)
            raced.append(ensure_synthetic(tmp_path, seed=0, **TINY))  # another process finishes first

    monkeypatch.setattr(synthetic, "generate", racing)
    root = ensure_synthetic(tmp_path, seed=0, **TINY)
    assert root == raced[1] and (root / COMPLETE_MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [root.name]


def test_class_colours_and_object_sizes(tmp_path):
    root = generate(tmp_path, seed=1, num_train=12, num_val=2, min_size=128, max_size=128, class_colours=True,
                    min_objects=1, max_objects=3, object_size=(0.3, 0.7), crowd_every=0)
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    assert {im["width"] for im in data["images"]} == {128} and not any(a["iscrowd"] for a in data["annotations"])
    per_image = {}
    for ann in data["annotations"]:
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
        assert max(ann["bbox"][2], ann["bbox"][3]) >= 0.3 * 128 - 1  # the aspect ratio shortens one side only
    assert set(per_image.values()) <= {1, 2, 3}
    # A rectangle fills its box: its centre pixel has its category's hue (JPEG noise aside).
    for ann in data["annotations"]:
        if ann["category_id"] != 1:
            continue
        x, y, w, h = ann["bbox"]
        image = Image.open(root / "train2017" / f"{ann['image_id']:012d}.jpg")
        pixel = image.getpixel((int(x + w / 2), int(y + h / 2)))
        if all(
            _clear_of(ann, other)
            for other in data["annotations"]
            if other is not ann and other["image_id"] == ann["image_id"]
        ):
            assert pixel[0] > 150 and pixel[1] < 110 and pixel[2] < 110, pixel


def _clear_of(ann, other) -> bool:
    """True when ``other`` does not cover ``ann``'s centre."""
    x, y, w, h = ann["bbox"]
    cx, cy = x + w / 2, y + h / 2
    ox, oy, ow, oh = other["bbox"]
    return not (ox <= cx <= ox + ow and oy <= cy <= oy + oh)


def test_bad_object_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="object_size"):
        generate(tmp_path, num_train=1, num_val=1, object_size=(0.5, 0.2))
