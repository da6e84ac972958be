"""Backbone parity: the frozen-BN ResNet and its padding masks, forward, input gradients and the
gradients of the trained layers (layer2-4)."""
import pytest
from torch import nn

from detr.misc import NestedTensor

pytestmark = pytest.mark.parity


class PixelsAsParameter(nn.Module):
    """The backbone with the padded images [B, 3, H, W] as a parameter, so that parity judges the
    gradient with respect to the input like any weight gradient."""

    def __init__(self, backbone: nn.Module, padded: NestedTensor):
        super().__init__()
        self.backbone = backbone
        self.pixels = nn.Parameter(padded.tensors.clone())
        self.register_buffer("mask", padded.mask.clone())

    def forward(self):
        feature = self.backbone[0](NestedTensor(self.pixels, self.mask))["0"]
        return {"features": feature.tensors, "mask": feature.mask}


def test_backbone(check_part, eval_model, padded_batch, precision):
    module = PixelsAsParameter(eval_model.backbone, padded_batch)
    result = check_part("backbone", module, (), lambda m, _: m(), precision)
    grads = {e["name"] for e in result.to_dict()["end_to_end"]}
    assert "grad pixels" in grads and any("layer4" in g for g in grads)
    assert not any("layer1" in g for g in grads), "layer1 is frozen and must have no gradient"
