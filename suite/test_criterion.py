"""Criterion parity: every loss term (and its aux copies) and the gradients with respect to the
predictions, with the Hungarian matching inside, as in training."""
import pytest
import torch
from torch import nn

from detr.engine import weighted_loss

pytestmark = pytest.mark.parity


class PredictionsAsParameters(nn.Module):
    """The model's outputs (final and auxiliary) as parameters, scored by the criterion."""

    def __init__(self, criterion: nn.Module, outputs: dict):
        super().__init__()
        self.criterion = criterion
        self.pred_logits = nn.Parameter(outputs["pred_logits"].clone())
        self.pred_boxes = nn.Parameter(outputs["pred_boxes"].clone())
        self.aux_logits = nn.Parameter(torch.stack([a["pred_logits"] for a in outputs["aux_outputs"]]))
        self.aux_boxes = nn.Parameter(torch.stack([a["pred_boxes"] for a in outputs["aux_outputs"]]))

    def forward(self, targets):
        outputs = {
            "pred_logits": self.pred_logits,
            "pred_boxes": self.pred_boxes,
            "aux_outputs": [{"pred_logits": l, "pred_boxes": b} for l, b in zip(self.aux_logits, self.aux_boxes)],
        }
        losses = self.criterion(outputs, targets)
        total = weighted_loss(losses, self.criterion.weight_dict)
        return {"total": total, **losses}


def test_criterion(check_part, detr_parts, eval_model, batch, precision):
    images, targets = batch
    with torch.no_grad():
        outputs = eval_model(images)
    module = PredictionsAsParameters(detr_parts[1], outputs)
    result = check_part("criterion", module, list(targets), lambda m, t: m(t), precision)
    names = {e["name"] for e in result.to_dict()["end_to_end"]}
    assert {"grad pred_logits", "grad pred_boxes", "grad aux_logits", "grad aux_boxes"} <= names
    for term in ("loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error", "loss_giou_0"):
        assert any(term in n for n in names), f"{term} not judged"
