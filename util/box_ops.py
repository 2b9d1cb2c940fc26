"""Box conversions and overlaps.

Boxes are either ``(cx, cy, w, h)`` or ``(x0, y0, x1, y1)``, last dimension 4.
"""
import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``(K, 4)`` xyxy boxes."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and union of ``(N, 4)`` and ``(M, 4)`` xyxy boxes, each ``(N, M)``."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalised IoU (https://giou.stanford.edu/) of xyxy boxes, ``(N, M)``.

    Boxes must be well formed (x1 >= x0, y1 >= y0); this is not checked here, to keep the
    loss free of host-device synchronisation: bad boxes show up as a non-finite loss.
    """
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalised IoU of each xyxy box in ``boxes1 (..., 4)`` with its counterpart in ``boxes2``:
    ``(...)``, the diagonal of ``generalized_box_iou`` without its ``N x M`` matrix (and, unlike
    torchvision's loss, without a boolean mask that reads the device)."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    overlap = (torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    inter = overlap[..., 0] * overlap[..., 1]
    union = area1 + area2 - inter
    hull = torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(boxes1[..., :2], boxes2[..., :2])
    enclosing = hull[..., 0] * hull[..., 1]
    return inter / union - (enclosing - union) / enclosing


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight xyxy boxes around ``(N, H, W)`` binary masks, ``(N, 4)``; empty masks give zeros."""
    if masks.numel() == 0:
        return torch.zeros((0, 4), device=masks.device)
    h, w = masks.shape[-2:]
    ys = torch.arange(h, dtype=torch.float, device=masks.device)
    xs = torch.arange(w, dtype=torch.float, device=masks.device)
    masks = masks.bool()
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    big = torch.tensor(1e8, device=masks.device)
    y_max = torch.where(rows, ys, -big).amax(dim=1)
    y_min = torch.where(rows, ys, big).amin(dim=1)
    x_max = torch.where(cols, xs, -big).amax(dim=1)
    x_min = torch.where(cols, xs, big).amin(dim=1)
    boxes = torch.stack([x_min, y_min, x_max, y_max], dim=1)
    return torch.where(rows.any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))
