"""One-to-one assignment of predictions to ground-truth boxes (Hungarian algorithm)."""
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """Matches each target to one query, minimising a weighted cost.

    cost = cost_class * (-p(target class)) + cost_bbox * L1(boxes) + cost_giou * (-GIoU).
    The cost is computed for the whole batch at once, then solved per image with scipy.
    """

    def __init__(self, cost_class: float = 1, cost_bbox: float = 1, cost_giou: float = 1):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0: set --set_cost_class, --set_cost_bbox or --set_cost_giou")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """outputs: ``pred_logits (B, Q, K+1)``, ``pred_boxes (B, Q, 4)`` cxcywh in [0, 1].

        targets: per image ``labels (T_b,)`` and ``boxes (T_b, 4)`` cxcywh.
        Returns per image ``(query_index, target_index)``, int64, length ``min(Q, T_b)``.
        """
        batch, num_queries = outputs["pred_logits"].shape[:2]
        probs = outputs["pred_logits"].flatten(0, 1).float().softmax(-1)   # (B*Q, K+1)
        boxes = outputs["pred_boxes"].flatten(0, 1).float()                # (B*Q, 4)
        target_labels = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets]).float()
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in targets]

        cost = (self.cost_bbox * torch.cdist(boxes, target_boxes, p=1)
                - self.cost_class * probs[:, target_labels]
                - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target_boxes)))
        cost = cost.view(batch, num_queries, -1).cpu()
        if not torch.isfinite(cost).all():
            raise FloatingPointError("non-finite matching cost: the model predicted NaN or inf")

        indices = []
        for b, block in enumerate(cost.split(sizes, -1)):
            rows, cols = linear_sum_assignment(block[b].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


def build_matcher(args: Any) -> HungarianMatcher:
    return HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                            cost_giou=args.set_cost_giou)
