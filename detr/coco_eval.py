"""COCO box AP with pycocotools, quiet, returning the 12 summary numbers by name."""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Dict, Iterable, List, Mapping, Union

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from runtime.distributed import all_gather_object

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _as_list(x: Any) -> list:
    return torch.as_tensor(x).detach().cpu().tolist()


def to_coco_results(predictions: Mapping[int, Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """{image_id: {"scores" [K], "labels" [K], "boxes" [K, 4] absolute xyxy}} -> COCO result dicts (xywh)."""
    results = []
    for image_id, pred in predictions.items():
        scores, labels, boxes = _as_list(pred["scores"]), _as_list(pred["labels"]), _as_list(pred["boxes"])
        if not (len(scores) == len(labels) == len(boxes)):
            raise ValueError(
                f"image {image_id}: {len(scores)} scores, {len(labels)} labels and {len(boxes)} boxes do not match"
            )
        for score, label, (x0, y0, x1, y1) in zip(scores, labels, boxes):
            results.append({
                "image_id": int(image_id),
                "category_id": int(label),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(score),
            })
    return results


class CocoEvaluator:
    """Accumulates detections over batches (and ranks) and summarises them against ``coco_gt``.

    Images count when they appear in an ``update``, with or without detections; with no update
    at all every ground-truth image counts. ``results`` and ``img_ids`` are plain lists, so
    ``state()`` can be gathered across processes and ``merge``d.
    """

    def __init__(self, coco_gt: COCO):
        self.coco_gt = coco_gt
        self.img_ids: List[int] = []
        self.results: List[Dict[str, Any]] = []
        self.summary_text = ""

    def update(self, predictions: Mapping[int, Mapping[str, Any]]) -> None:
        unknown = [int(i) for i in predictions if int(i) not in self.coco_gt.imgs]
        if unknown:
            raise ValueError(f"predictions for {len(unknown)} image ids absent from the ground truth: {unknown[:5]}")
        self.img_ids.extend(int(i) for i in predictions)
        self.results.extend(to_coco_results(predictions))

    def state(self) -> Dict[str, list]:
        return {"img_ids": list(self.img_ids), "results": list(self.results)}

    def merge(self, others: Iterable[Union["CocoEvaluator", Dict[str, list]]]) -> None:
        """Adds the images and detections of other evaluators or of their ``state()``."""
        for other in others:
            state = other.state() if isinstance(other, CocoEvaluator) else other
            self.img_ids.extend(state["img_ids"])
            self.results.extend(state["results"])

    def synchronize_between_processes(self) -> None:
        """Gathers every rank's state into every rank (no-op without torch.distributed)."""
        states = all_gather_object(self.state())
        if len(states) == 1:
            return
        self.img_ids, self.results = [], []
        self.merge(states)

    def summarize(self) -> Dict[str, Any]:
        """{"stats": 12 floats, "AP": ..., "AP50": ..., ..., "ARl": ...}; -1 where COCO has no ground truth."""
        img_ids = sorted(set(self.img_ids)) or sorted(self.coco_gt.getImgIds())
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            coco_dt = self._load_results()
            evaluator = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            evaluator.params.imgIds = img_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        self.summary_text = out.getvalue()
        stats = [float(s) for s in evaluator.stats]
        return {"stats": stats, **dict(zip(STAT_NAMES, stats))}

    def _load_results(self) -> COCO:
        if self.results:
            return self.coco_gt.loadRes(copy.deepcopy(self.results))
        # loadRes cannot take an empty list.
        coco_dt = COCO()
        coco_dt.dataset = {
            "images": list(self.coco_gt.dataset["images"]),
            "categories": copy.deepcopy(self.coco_gt.dataset["categories"]),
            "annotations": [],
        }
        coco_dt.createIndex()
        return coco_dt


def evaluate_coco(coco_gt: COCO, predictions: Mapping[int, Mapping[str, Any]]) -> Dict[str, Any]:
    """COCO bbox summary of ``predictions`` over their images (all images when there are none)."""
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(predictions)
    return evaluator.summarize()
