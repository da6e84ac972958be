"""The DETR detector (backbone, transformer, heads) and the post-processing to COCO boxes."""
from typing import Dict, List, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import box_ops
from .misc import NestedTensor, nested_tensor_from_tensor_list


class DETR(nn.Module):
    """Detects ``num_queries`` objects per image.

    forward(list of [3, H_i, W_i] images, or a NestedTensor [B, 3, H, W] with mask [B, H, W]) ->
    ``pred_logits`` [B, Q, C + 1] (the last class is "no object"), ``pred_boxes`` [B, Q, 4]
    (cx, cy, w, h in 0..1 of the unpadded image) and, with ``aux_loss``, ``aux_outputs``: the same
    two for each decoder layer but the last.
    """

    def __init__(
        self, backbone: nn.Module, transformer: nn.Module, num_classes: int, num_queries: int, aux_loss: bool = False
    ):
        super().__init__()
        self.num_queries = num_queries
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss

    def forward(self, samples: Union[NestedTensor, Sequence[Tensor]]) -> Dict[str, object]:
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(list(samples))
        features, pos = self.backbone(samples)
        src, mask = features[-1].decompose()
        hs = self.transformer(self.input_proj(src), mask, self.query_embed.weight, pos[-1])[0]
        outputs_class = self.class_embed(hs)
        outputs_coord = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = self._set_aux_loss(outputs_class, outputs_coord)
        return out

    @torch.jit.unused
    def _set_aux_loss(self, outputs_class: Tensor, outputs_coord: Tensor) -> List[Dict[str, Tensor]]:
        return [{"pred_logits": a, "pred_boxes": b} for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]


class MLP(nn.Module):
    """A feed-forward network of ``num_layers`` linear layers with ReLU between them: [..., in] -> [..., out]."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


class PostProcess(nn.Module):
    """Turns the model's output into COCO-style detections in the original image's pixels."""

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        """target_sizes [B, 2] (h, w) -> per image ``scores`` [Q], ``labels`` [Q], ``boxes`` [Q, 4] xyxy."""
        out_logits, out_bbox = outputs["pred_logits"], outputs["pred_boxes"]
        if len(out_logits) != len(target_sizes) or target_sizes.shape[1] != 2:
            raise ValueError(
                f"target_sizes must be [B, 2] with B = {len(out_logits)}, got {tuple(target_sizes.shape)}"
            )
        prob = F.softmax(out_logits, -1)
        scores, labels = prob[..., :-1].max(-1)
        boxes = box_ops.box_cxcywh_to_xyxy(out_bbox)
        img_h, img_w = target_sizes.unbind(1)
        scale_fct = torch.stack([img_w, img_h, img_w, img_h], dim=1)
        boxes = boxes * scale_fct[:, None, :]
        return [{"scores": s, "labels": c, "boxes": b} for s, c, b in zip(scores, labels, boxes)]
