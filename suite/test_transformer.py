"""Transformer parity: encoder and decoder with the padding mask, positions on queries and keys,
and all intermediate decoder outputs, forward and backward."""
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.parity


class TransformerOnFeatures(nn.Module):
    """The model's transformer on a projected feature map [B, D, h, w] and its positions."""

    def __init__(self, model: nn.Module, src: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor):
        super().__init__()
        self.transformer = model.transformer
        self.query_embed = model.query_embed
        self.src = nn.Parameter(src)
        self.register_buffer("mask", mask)
        self.register_buffer("pos", pos)

    def forward(self):
        hs, memory = self.transformer(self.src, self.mask, self.query_embed.weight, self.pos)
        return {"hs": hs, "memory": memory}


@pytest.fixture(scope="module")
def transformer_inputs(eval_model, padded_batch):
    """The real inputs of the transformer for the batch: input_proj(features), mask, positions."""
    with torch.no_grad():
        features, pos = eval_model.backbone(padded_batch)
        src, mask = features[-1].decompose()
        return eval_model.input_proj(src), mask, pos[-1]


def test_transformer(check_part, eval_model, transformer_inputs, precision):
    module = TransformerOnFeatures(eval_model, *transformer_inputs)
    assert module.mask.any(), "the batch must have padding so that the attention masks matter"
    result = check_part("transformer", module, (), lambda m, _: m(), precision)
    names = {e["name"] for e in result.to_dict()["end_to_end"]}
    assert "grad src" in names and "grad query_embed.weight" in names
    modules = {row["module"] for row in result.rows()}
    assert any(m.startswith("transformer.encoder.layers") for m in modules)
    assert any(".multihead_attn" in m for m in modules)
