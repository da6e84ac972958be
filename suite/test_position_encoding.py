"""Position encoding parity: the sine encoding of the padded feature map (the reference's choice)
and the learned row/column embeddings, forward and backward."""
import pytest
import torch
from torch import nn

from detr.misc import NestedTensor
from detr.position_encoding import PositionEmbeddingLearned

pytestmark = pytest.mark.parity


class EncodeFeatureMap(nn.Module):
    """A position encoding applied to a feature map [B, C, h, w] with its padding mask [B, h, w]."""

    def __init__(self, encoding: nn.Module, features: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.encoding = encoding
        self.register_buffer("features", features)
        self.register_buffer("mask", mask)

    def forward(self):
        return self.encoding(NestedTensor(self.features, self.mask))


@pytest.fixture(scope="module")
def feature_map(eval_model, padded_batch):
    """The backbone's last feature map of the batch and its mask: the encoding's real input."""
    with torch.no_grad():
        feature = eval_model.backbone[0](padded_batch)["0"]
    return feature.tensors, feature.mask


def test_sine_position_encoding(check_part, eval_model, feature_map, precision):
    module = EncodeFeatureMap(eval_model.backbone[1], *feature_map)
    result = check_part("position encoding (sine)", module, (), lambda m, _: m(), precision)
    assert result.ops_checked > 10


def test_learned_position_encoding(check_part, eval_model, feature_map, precision):
    torch.manual_seed(0)
    learned = PositionEmbeddingLearned(eval_model.transformer.d_model // 2)
    module = EncodeFeatureMap(learned, *feature_map)
    result = check_part("position encoding (learned)", module, (), lambda m, _: m(), precision)
    assert {e["name"] for e in result.to_dict()["end_to_end"]} >= {"grad encoding.row_embed.weight", "grad encoding.col_embed.weight"}
