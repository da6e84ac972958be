"""COCO box evaluation: perfect, shifted and empty detections, batching and merging."""
from pathlib import Path

import pytest
import torch

from detr.coco_eval import STAT_NAMES, CocoEvaluator, evaluate_coco, to_coco_results
from detr.data import CocoDetection
from detr.data.synthetic import generate


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root: Path = generate(tmp_path_factory.mktemp("eval"), seed=7, num_train=1, num_val=12, crowd_every=3)
    ds = CocoDetection(root / "val2017", root / "annotations" / "instances_val2017.json")
    assert any(a["iscrowd"] for a in ds.coco.anns.values()), "crowd regions must be in the ground truth"
    return ds.coco


def ground_truth_predictions(coco, shift: float = 0.0, label_offset: int = 0):
    """Non-crowd ground truth as detections of score 1, boxes moved right by ``shift`` of their width."""
    predictions = {}
    for image_id in coco.getImgIds():
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = torch.tensor([[x + shift * w, y, x + w + shift * w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        predictions[image_id] = {
            "scores": torch.ones(len(anns)),
            "labels": torch.tensor([a["category_id"] + label_offset for a in anns]),
            "boxes": boxes.reshape(-1, 4),
        }
    return predictions


def test_ground_truth_scores_perfectly(coco, capsys):
    result = evaluate_coco(coco, ground_truth_predictions(coco))
    assert capsys.readouterr().out == "", "pycocotools must stay quiet"
    assert len(result["stats"]) == 12
    assert [result[k] for k in STAT_NAMES] == result["stats"]
    assert result["AP"] == pytest.approx(1.0)
    assert result["AP50"] == pytest.approx(1.0)
    assert result["AR100"] == pytest.approx(1.0)


def test_shifted_boxes_score_lower(coco):
    perfect = evaluate_coco(coco, ground_truth_predictions(coco))["AP"]
    shifted = evaluate_coco(coco, ground_truth_predictions(coco, shift=0.15))
    assert 0.0 < shifted["AP"] < perfect - 0.2
    assert shifted["AP50"] == pytest.approx(1.0), "a 15% shift keeps IoU above 0.5"


def test_wrong_labels_score_zero(coco):
    assert evaluate_coco(coco, ground_truth_predictions(coco, label_offset=100))["AP"] == 0.0


def test_empty_predictions_score_zero(coco):
    assert evaluate_coco(coco, {})["AP"] == 0.0
    empty = {
        i: {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
        for i in coco.getImgIds()
    }
    result = evaluate_coco(coco, empty)
    assert result["AP"] == 0.0 and result["AR100"] == 0.0


def test_only_updated_images_count(coco):
    predictions = ground_truth_predictions(coco)
    first = sorted(predictions)[0]
    assert evaluate_coco(coco, {first: predictions[first]})["AP"] == pytest.approx(1.0)


def test_batches_and_merged_ranks_match_one_shot(coco):
    predictions = ground_truth_predictions(coco, shift=0.1)
    ids = sorted(predictions)
    whole = evaluate_coco(coco, predictions)

    batched = CocoEvaluator(coco)
    for k in range(0, len(ids), 5):
        batched.update({i: predictions[i] for i in ids[k:k + 5]})
    assert batched.summarize()["stats"] == whole["stats"]

    ranks = [CocoEvaluator(coco) for _ in range(2)]
    for r, evaluator in enumerate(ranks):
        evaluator.update({i: predictions[i] for i in ids[r::2]})
    merged = CocoEvaluator(coco)
    merged.merge([ranks[0].state(), ranks[1]])
    assert merged.summarize()["stats"] == whole["stats"]
    assert "Average Precision" in merged.summary_text


def test_results_are_plain_xywh():
    results = to_coco_results(
        {3: {"scores": [0.5], "labels": torch.tensor([2]), "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0]])}}
    )
    assert results == [{"image_id": 3, "category_id": 2, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.5}]
    assert all(type(v) in (int, float, list) for v in results[0].values())


def test_bad_predictions_are_refused(coco):
    with pytest.raises(ValueError, match="absent from the ground truth"):
        evaluate_coco(coco, {123456: {"scores": [], "labels": [], "boxes": torch.zeros(0, 4)}})
    image_id = coco.getImgIds()[0]
    with pytest.raises(ValueError, match="do not match"):
        evaluate_coco(coco, {image_id: {"scores": [1.0, 0.5], "labels": [1], "boxes": torch.zeros(1, 4)}})
