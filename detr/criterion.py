"""The DETR set criterion: classification, L1 and GIoU box losses on Hungarian-matched pairs."""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import box_ops
from .misc import get_world_size, is_dist_avail_and_initialized

Indices = List[Tuple[Tensor, Tensor]]


class SetCriterion(nn.Module):
    """Matches predictions to targets, then computes the losses named in ``losses``.

    Targets are dicts with ``labels`` [T_i] int64 and ``boxes`` [T_i, 4] cxcywh in 0..1.
    Returns ``loss_ce``, ``class_error``, ``loss_bbox``, ``loss_giou``, ``cardinality_error`` and,
    for each auxiliary decoder layer i, the same with the suffix ``_i`` (no class_error there).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        eos_coef: float,
        losses: Sequence[str],
    ):
        super().__init__()
        unknown = set(losses) - set(self._loss_fns())
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}: expected some of {sorted(self._loss_fns())}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = list(losses)
        empty_weight = torch.ones(self.num_classes + 1)
        empty_weight[-1] = self.eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(self, outputs, targets, indices: Indices, num_boxes: float, log: bool = True) -> Dict[str, Tensor]:
        """Cross-entropy over C + 1 classes, "no object" weighted by eos_coef."""
        src_logits = outputs["pred_logits"]
        idx = self._get_src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64, device=src_logits.device)
        target_classes[idx] = target_classes_o
        loss_ce = F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight.to(src_logits.dtype))
        losses = {"loss_ce": loss_ce}
        if log:
            losses["class_error"] = 100 - accuracy(src_logits[idx], target_classes_o)
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices: Indices, num_boxes: float) -> Dict[str, Tensor]:
        """L1 error of the number of predicted objects; logged, not optimised."""
        pred_logits = outputs["pred_logits"]
        tgt_lengths = torch.as_tensor([len(v["labels"]) for v in targets], device=pred_logits.device)
        card_pred = (pred_logits.argmax(-1) != pred_logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card_pred.float(), tgt_lengths.float())}

    def loss_boxes(self, outputs, targets, indices: Indices, num_boxes: float) -> Dict[str, Tensor]:
        """L1 and 1 - GIoU of the matched boxes, summed and divided by num_boxes."""
        idx = self._get_src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat([t["boxes"][i] for t, (_, i) in zip(targets, indices)], dim=0)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        giou = box_ops.aligned_generalized_box_iou(
            box_ops.box_cxcywh_to_xyxy(src_boxes), box_ops.box_cxcywh_to_xyxy(target_boxes)
        )
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": (1 - giou).sum() / num_boxes}

    @staticmethod
    def _get_src_permutation_idx(indices: Indices) -> Tuple[Tensor, Tensor]:
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for (src, _) in indices])
        return batch_idx, src_idx

    def _loss_fns(self):
        return {"labels": self.loss_labels, "cardinality": self.loss_cardinality, "boxes": self.loss_boxes}

    def get_loss(self, loss: str, outputs, targets, indices: Indices, num_boxes: float, **kwargs) -> Dict[str, Tensor]:
        return self._loss_fns()[loss](outputs, targets, indices, num_boxes, **kwargs)

    def num_boxes(self, targets, device: torch.device) -> float:
        """Targets per rank, averaged over ranks, at least 1: the normaliser of the box losses."""
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if is_dist_avail_and_initialized():
            dist.all_reduce(num_boxes)
        return torch.clamp(num_boxes / get_world_size(), min=1).item()

    def forward(self, outputs: Dict[str, object], targets: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        aux = outputs.get("aux_outputs", [])
        final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        all_indices = self.matcher.match_many([final] + list(aux), targets)
        num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)
        losses = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, final, targets, all_indices[0], num_boxes))
        for i, (aux_outputs, indices) in enumerate(zip(aux, all_indices[1:])):
            for loss in self.losses:
                kwargs = {"log": False} if loss == "labels" else {}
                l_dict = self.get_loss(loss, aux_outputs, targets, indices, num_boxes, **kwargs)
                losses.update({k + f"_{i}": v for k, v in l_dict.items()})
        return losses


@torch.no_grad()
def accuracy(output: Tensor, target: Tensor) -> Tensor:
    """Top-1 accuracy in percent of logits [N, C] against labels [N]; 0 when N = 0."""
    if target.numel() == 0:
        return torch.zeros([], device=output.device)
    pred = output.argmax(-1)
    return pred.eq(target).float().sum(0).mul_(100.0 / target.size(0))
