"""Parity of the class and box heads (forward and backward), the full model's forward from images
to predictions, and PostProcess."""
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.parity


class Heads(nn.Module):
    """The class head and the 3-layer box MLP (with its sigmoid) on decoder outputs [L, B, Q, D]."""

    def __init__(self, model: nn.Module, hs: torch.Tensor):
        super().__init__()
        self.class_embed = model.class_embed
        self.bbox_embed = model.bbox_embed
        self.hs = nn.Parameter(hs)

    def forward(self):
        return {"pred_logits": self.class_embed(self.hs), "pred_boxes": self.bbox_embed(self.hs).sigmoid()}


@pytest.fixture(scope="module")
def decoder_outputs(eval_model, padded_batch):
    with torch.no_grad():
        features, pos = eval_model.backbone(padded_batch)
        src, mask = features[-1].decompose()
        return eval_model.transformer(eval_model.input_proj(src), mask, eval_model.query_embed.weight, pos[-1])[0]


def test_heads(check_part, eval_model, decoder_outputs, precision):
    result = check_part("heads", Heads(eval_model, decoder_outputs), (), lambda m, _: m(), precision)
    names = {e["name"] for e in result.to_dict()["end_to_end"]}
    assert {"grad hs", "grad class_embed.weight", "grad bbox_embed.layers.2.weight"} <= names


def forward_only(model, images):
    with torch.no_grad():
        return model(images)


def test_model_forward(check_part, eval_model, batch, precision):
    images, _ = batch
    result = check_part("model forward", eval_model, list(images), forward_only, precision)
    outputs = {e["name"] for e in result.to_dict()["end_to_end"]}
    assert any("pred_logits" in o for o in outputs) and any("aux_outputs" in o for o in outputs)


def test_postprocess(check_part, detr_parts, eval_model, batch, precision):
    images, _ = batch
    with torch.no_grad():
        out = eval_model(images)
    predictions = {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}
    sizes = torch.tensor([[480, 640], [427, 512]])
    result = check_part("postprocess", detr_parts[2], (predictions, sizes), lambda m, inp: m(*inp), precision)
    assert result.ops_checked > 0
