"""A deterministic synthetic detection set in the COCO layout: coloured shapes on varied backgrounds.

``generate`` writes ``train2017/``, ``val2017/`` (JPEG) and ``annotations/instances_{train,val}2017.json``;
the same seed and parameters give byte-identical files. ``ensure_synthetic`` keeps one generated copy
per parameter set in a cache folder, written atomically so that concurrent processes can share it.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 1
COMPLETE_MARKER = ".complete"
JPEG_QUALITY = 92
CATEGORIES = ("rectangle", "ellipse", "triangle", "cross", "ring", "diamond")
MIN_CONTRAST = 140.0
MIN_OBJECT_PX = 12
MAX_COVERED = 0.4
SPLITS = ("train", "val")

Box = Tuple[int, int, int, int]


# Saturated hues, one per category, for sets whose colour tells the class (``class_colours``).
PALETTE = ((230, 40, 40), (40, 200, 40), (40, 80, 230), (230, 210, 30), (30, 210, 220), (210, 40, 210))


def _background(rng: np.random.Generator, w: int, h: int, grey: bool = False) -> np.ndarray:
    """[h, w, 3] uint8: plain colour, linear gradient between two colours, or colour plus noise (greys only
    if ``grey``)."""
    kind = int(rng.integers(3))
    c0 = rng.integers(0, 256, 3).astype(np.float32)
    if grey:
        c0[:] = c0[0]
    if kind == 0:
        img = np.broadcast_to(c0, (h, w, 3))
    elif kind == 1:
        c1 = rng.integers(0, 256, 3).astype(np.float32)
        if grey:
            c1[:] = c1[0]
        theta = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xs * math.cos(theta) + ys * math.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    else:
        sigma = rng.uniform(8, 30)
        img = c0 + rng.normal(0, sigma, (h, w, 3)).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _contrasting_colour(rng: np.random.Generator, local_mean: np.ndarray) -> Tuple[int, int, int]:
    for _ in range(20):
        colour = rng.integers(0, 256, 3)
        if float(np.linalg.norm(colour - local_mean)) >= MIN_CONTRAST:
            return tuple(int(c) for c in colour)
    return tuple(int(c) for c in np.where(local_mean < 128, 255, 0))


def _draw_shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, category: str, box: Box, colour) -> None:
    """Draws ``category`` so that it touches all four sides of ``box`` = [x0, x1) x [y0, y1)."""
    x0, y0, x1, y1 = box
    xe, ye = x1 - 1, y1 - 1
    cx, cy = (x0 + xe) / 2, (y0 + ye) / 2
    short = min(x1 - x0, y1 - y0)
    if category == "rectangle":
        draw.rectangle([x0, y0, xe, ye], fill=colour)
    elif category == "ellipse":
        draw.ellipse([x0, y0, xe, ye], fill=colour)
    elif category == "triangle":
        corners = {
            0: [(x0, ye), (xe, ye), (cx, y0)],
            1: [(x0, y0), (xe, y0), (cx, ye)],
            2: [(x0, y0), (x0, ye), (xe, cy)],
            3: [(xe, y0), (xe, ye), (x0, cy)],
        }
        draw.polygon(corners[int(rng.integers(4))], fill=colour)
    elif category == "cross":
        half = max(1.0, short * rng.uniform(0.25, 0.4) / 2)
        draw.rectangle([x0, round(cy - half), xe, round(cy + half)], fill=colour)
        draw.rectangle([round(cx - half), y0, round(cx + half), ye], fill=colour)
    elif category == "ring":
        width = max(2, int(round(short * rng.uniform(0.15, 0.3))))
        draw.ellipse([x0, y0, xe, ye], outline=colour, width=width)
    elif category == "diamond":
        draw.polygon([(cx, y0), (xe, cy), (cx, ye), (x0, cy)], fill=colour)
    else:
        raise ValueError(f"unknown shape {category!r}")


def _covered(a: Box, b: Box) -> float:
    """Intersection of ``a`` and ``b`` over the area of the smaller one."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _place(
    rng: np.random.Generator, w: int, h: int, bw: int, bh: int, taken: List[Box], avoid: List[Box]
) -> Optional[Box]:
    """A box of bw x bh inside the image, partly overlapping ``taken`` boxes, disjoint from ``avoid``."""
    for _ in range(30):
        x0 = int(rng.integers(0, w - bw + 1))
        y0 = int(rng.integers(0, h - bh + 1))
        box = (x0, y0, x0 + bw, y0 + bh)
        if all(_covered(box, other) <= MAX_COVERED for other in taken) and all(
            _covered(box, other) == 0 for other in avoid
        ):
            return box
    return None


def _object_size(rng: np.random.Generator, w: int, h: int, lo: float, hi: float) -> Tuple[int, int]:
    side = rng.uniform(lo, hi) * min(w, h)
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    bw = int(round(side * math.sqrt(aspect)))
    bh = int(round(side / math.sqrt(aspect)))
    return min(max(bw, MIN_OBJECT_PX), w), min(max(bh, MIN_OBJECT_PX), h)


def _make_image(
    rng: np.random.Generator, w: int, h: int, min_objects: int, max_objects: int, with_crowd: bool,
    class_colours: bool = False, object_size: Tuple[float, float] = (0.15, 0.5),
) -> Tuple[Image.Image, List[Dict[str, Any]]]:
    """One image and its objects: dicts with ``category_id``, ``box`` (xyxy, integers) and ``iscrowd``."""
    background = _background(rng, w, h, grey=class_colours)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    objects: List[Dict[str, Any]] = []
    taken: List[Box] = []
    crowds: List[Box] = []

    def colour_for(box: Box, category: int):
        if class_colours:
            return tuple(int(c) for c in np.clip(np.array(PALETTE[category]) + rng.integers(-20, 21, 3), 0, 255))
        return _contrasting_colour(rng, background[box[1]:box[3], box[0]:box[2]].reshape(-1, 3).mean(0))

    if with_crowd:
        # A cluster of tiny copies of one shape, annotated as one crowd region like COCO's.
        region = _place(rng, w, h, *_object_size(rng, w, h, 0.3, 0.45), taken, crowds)
        if region is not None:
            category = int(rng.integers(len(CATEGORIES)))
            colour = colour_for(region, category)
            for _ in range(int(rng.integers(8, 17))):
                s = int(rng.integers(5, 9))
                x0 = int(rng.integers(region[0], region[2] - s + 1))
                y0 = int(rng.integers(region[1], region[3] - s + 1))
                _draw_shape(draw, rng, CATEGORIES[category], (x0, y0, x0 + s, y0 + s), colour)
            crowds.append(region)
            objects.append({"category_id": category + 1, "box": region, "iscrowd": 1})

    wanted = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(3 * wanted):
        if len(taken) == wanted:
            break
        box = _place(rng, w, h, *_object_size(rng, w, h, *object_size), taken, crowds)
        if box is None:
            continue
        category = int(rng.integers(len(CATEGORIES)))
        _draw_shape(draw, rng, CATEGORIES[category], box, colour_for(box, category))
        taken.append(box)
        objects.append({"category_id": category + 1, "box": box, "iscrowd": 0})
    return image, objects


def _generate_split(
    root: Path, split: str, seed: int, num_images: int, first_image_id: int,
    min_size: int, max_size: int, min_objects: int, max_objects: int, crowd_every: int, class_colours: bool,
    object_size: Tuple[float, float],
) -> Dict[str, Any]:
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        # One stream per image: an image does not depend on how many came before it.
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        w = int(rng.integers(min_size, max_size + 1))
        h = int(rng.integers(min_size, max_size + 1))
        with_crowd = crowd_every > 0 and index % crowd_every == crowd_every // 2
        image, objects = _make_image(rng, w, h, min_objects, max_objects, with_crowd, class_colours, tuple(object_size))
        image_id = first_image_id + index
        file_name = f"{image_id:012d}.jpg"
        image.save(folder / file_name, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": obj["category_id"],
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": float((x1 - x0) * (y1 - y0)),
                "iscrowd": obj["iscrowd"],
            })
    return {
        "info": {"description": f"synthetic shapes ({split}, seed {seed})", "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)],
    }


def generate(
    root: Union[str, Path],
    seed: int = 0,
    num_train: int = 512,
    num_val: int = 64,
    min_size: int = 128,
    max_size: int = 320,
    min_objects: int = 1,
    max_objects: int = 6,
    crowd_every: int = 10,
    class_colours: bool = False,
    object_size: Tuple[float, float] = (0.15, 0.5),
) -> Path:
    """Writes the synthetic set under ``root`` and returns ``root``.

    Image sides are drawn independently in [min_size, max_size]; each image holds
    min_objects..max_objects shapes (fewer only when repeated placement fails), and every ``crowd_every``-th
    image also holds one crowd region (0: none). With ``class_colours`` each category has its own
    hue on grey backgrounds, so colour as well as shape tells the class. An object's side is drawn
    from ``object_size`` (fractions of the image's shorter side). Train ids are 1..num_train, val ids follow.
    """
    if not 1 <= min_size <= max_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
    if min_size < 2 * MIN_OBJECT_PX:
        raise ValueError(f"min_size {min_size} is too small for objects of at least {MIN_OBJECT_PX} px")
    if not 0 < object_size[0] <= object_size[1] <= 1:
        raise ValueError(f"object_size must be fractions 0 < low <= high <= 1, got {tuple(object_size)}")
    if not 0 <= min_objects <= max_objects:
        raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    first_ids = {"train": 1, "val": num_train + 1}
    counts = {"train": num_train, "val": num_val}
    for split in SPLITS:
        data = _generate_split(
            root, split, seed, counts[split], first_ids[split],
            min_size, max_size, min_objects, max_objects, crowd_every, class_colours, object_size,
        )
        with open(root / "annotations" / f"instances_{split}2017.json", "w", encoding="utf-8") as f:
            json.dump(data, f)
    return root


# Taken once, so that a wrapped or patched ``generate`` hashes the same parameters.
GENERATE_DEFAULTS = {
    name: p.default for name, p in inspect.signature(generate).parameters.items() if name not in ("root", "seed")
}


def default_root() -> Path:
    """The cache folder: ``$DETR_SYNTHETIC_CACHE`` if set, else ``~/.cache/detr-conformance``."""
    env = os.environ.get("DETR_SYNTHETIC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "detr-conformance"


def _full_params(seed: int, params: Dict[str, Any]) -> Dict[str, Any]:
    unknown = sorted(set(params) - set(GENERATE_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown synthetic dataset parameter(s) {unknown}; known: {sorted(GENERATE_DEFAULTS)}")
    return {"generator_version": GENERATOR_VERSION, "seed": seed, **GENERATE_DEFAULTS, **params}


def _discard(path: Path) -> None:
    """Moves ``path`` aside (atomic) before deleting it, so nobody sees it half-deleted."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def ensure_synthetic(root: Optional[Union[str, Path]] = None, seed: int = 0, **params) -> Path:
    """The folder of the synthetic set for these parameters, generated on first use.

    Lives in ``<root or default_root()>/synthetic-<hash of parameters and generator version>``.
    A set is generated in a temporary sibling and renamed into place with its completion
    marker already inside; a folder without the marker is regenerated.
    """
    full = _full_params(seed, params)
    digest = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(root) if root is not None else default_root()
    target = cache / f"synthetic-{digest}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache))
    try:
        os.chmod(tmp, 0o755)
        generate(tmp, seed=seed, **params)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(full, sort_keys=True) + "\n")
        if target.exists() and not (target / COMPLETE_MARKER).is_file():
            _discard(target)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first; its set is identical.
            if not (target / COMPLETE_MARKER).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
