"""Hungarian matching of predictions to targets (scipy's linear_sum_assignment on the CPU)."""
from typing import Dict, List, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .misc import NonFiniteError


class HungarianMatcher(nn.Module):
    """Cost = cost_class * (-p(target class)) + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU).

    Several sets of predictions (e.g. every decoder layer) are matched in one call: their cost
    matrices are computed together and copied to the host once, instead of once per layer.
    """

    def __init__(self, cost_class: float = 1, cost_bbox: float = 1, cost_giou: float = 1):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def cost_matrix(self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]]) -> Tensor:
        """pred_logits [N, Q, C + 1], pred_boxes [N, Q, 4] -> cost [N, Q, T] against all T targets of the batch.

        N may be a multiple of len(targets) (several layers stacked); each target set then repeats.
        """
        n, num_queries = outputs["pred_logits"].shape[:2]
        # At least float32: half-precision costs make ties, and the CPU has no half cdist.
        dtype = torch.promote_types(outputs["pred_logits"].dtype, torch.float32)
        out_prob = outputs["pred_logits"].flatten(0, 1).to(dtype).softmax(-1)
        out_bbox = outputs["pred_boxes"].flatten(0, 1).to(dtype)
        tgt_ids = torch.cat([v["labels"] for v in targets])
        tgt_bbox = torch.cat([v["boxes"] for v in targets]).to(dtype)
        cost_class = -out_prob[:, tgt_ids]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
        c = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return c.view(n, num_queries, -1)

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """Returns per image (index of the matched predictions, index of the matched targets), int64 on the CPU."""
        return self.match_many([outputs], targets)[0]

    @torch.no_grad()
    def match_many(
        self, outputs_list: Sequence[Dict[str, Tensor]], targets: Sequence[Dict[str, Tensor]]
    ) -> List[List[Tuple[Tensor, Tensor]]]:
        """Matches each of several prediction sets of the same batch; one cost computation, one host copy."""
        stacked = {k: torch.cat([o[k] for o in outputs_list]) for k in ("pred_logits", "pred_boxes")}
        sizes = [len(v["boxes"]) for v in targets]
        bs = len(targets)
        if sum(sizes) == 0:
            empty = (torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
            return [[empty] * bs for _ in outputs_list]
        cost = self.cost_matrix(stacked, targets).cpu()
        if not bool(torch.isfinite(cost).all()):
            bad = int((~torch.isfinite(cost)).sum())
            raise NonFiniteError(
                f"matcher: {bad} of {cost.numel()} cost entries are NaN or Inf; "
                "the predictions (pred_logits or pred_boxes) are not finite"
            )
        blocks = cost.split(sizes, -1)
        result = []
        for layer in range(len(outputs_list)):
            indices = []
            for b, block in enumerate(blocks):
                i, j = linear_sum_assignment(block[layer * bs + b])
                indices.append((torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
            result.append(indices)
        return result


def build_matcher(cfg) -> HungarianMatcher:
    return HungarianMatcher(cost_class=cfg.set_cost_class, cost_bbox=cfg.set_cost_bbox, cost_giou=cfg.set_cost_giou)
